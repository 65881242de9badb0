//! Certificates made at test time for the TLS tests (feature `test-pki`): a CA, a server
//! certificate it signs for `localhost` and 127.0.0.1 (good for client authentication too,
//! as a worker's is), a client certificate it signs, and an unrelated CA.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// PEM files written into one folder.
#[derive(Clone, Debug)]
pub struct TestPki {
    /// The CA certificate.
    pub ca: PathBuf,
    /// A certificate for `localhost` and 127.0.0.1 signed by the CA (server and client use).
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// A client certificate signed by the CA.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// A CA that signed none of these.
    pub other_ca: PathBuf,
}

fn ca(name: &str) -> (CertificateParams, KeyPair) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    (params, KeyPair::generate().expect("ca key"))
}

fn leaf(
    name: &str,
    names: &[&str],
    usages: Vec<ExtendedKeyUsagePurpose>,
    issuer: &Issuer<'_, KeyPair>,
) -> (String, String) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names).expect("leaf params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = usages;
    let key = KeyPair::generate().expect("leaf key");
    let cert = params.signed_by(&key, issuer).expect("sign leaf");
    (cert.pem(), key.serialize_pem())
}

impl TestPki {
    /// Makes the certificates and writes them into `dir` (created if absent).
    pub fn generate(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("pki dir");
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("write pem");
            path
        };
        let (params, key) = ca("spin test CA");
        let ca_pem = params.self_signed(&key).expect("self-sign ca").pem();
        let issuer = Issuer::new(params, key);
        let (server_cert, server_key) = leaf(
            "spin test server",
            &["localhost", "127.0.0.1"],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            &issuer,
        );
        let (client_cert, client_key) = leaf(
            "spin test client",
            &["spinctl.test"],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            &issuer,
        );
        let (other, other_key) = ca("unrelated CA");
        let other_pem = other
            .self_signed(&other_key)
            .expect("self-sign other")
            .pem();
        Self {
            ca: write("ca.pem", &ca_pem),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server.key", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client.key", &client_key),
            other_ca: write("other-ca.pem", &other_pem),
        }
    }
}
