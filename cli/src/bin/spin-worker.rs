//! `spin-worker`: the worker daemon (placeholder until the daemon lands).

fn main() {
    eprintln!("spin-worker: not built yet");
    std::process::exit(2);
}
