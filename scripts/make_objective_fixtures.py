#!/usr/bin/env python3
"""Reference fixtures for the training objectives (SPIN-Diffusion, Diffusion-DPO, SFT) and AdamW.

Run from the repository root (CPU is enough; needs torch, diffusers, transformers, safetensors):

    python scripts/make_objective_fixtures.py

Writes, under ``worker/tests/fixtures/objectives/``:

* ``theta/`` -- ``UNet2DConditionModel.save_pretrained(..., safe_serialization=True)`` of theta
  (config.json + diffusion_pytorch_model.safetensors, float32).
* ``inputs.safetensors`` -- the batch (see "Inputs" below).
* ``cases.json`` -- ``[{"name", "objective", "loss", "weighting", "noise", "reduction", "beta"}]``.
* ``expected.safetensors`` -- per case loss / z / w / grad_norm / three parameter gradients, the
  AdamW trajectory and the at-reference loss (see "Expected tensors").
* ``README.md`` -- the same spec plus the float32-vs-float64 noise floor measured by this run.

Everything the Rust side must reproduce is specified below; the code follows it literally.

Models
------
* theta_k = ``worker/tests/fixtures/tiny-a/unet`` (float32, eval mode, frozen).
* theta   = copy of theta_k with ``p += 0.01 * randn_like(p)`` for every parameter, in
  ``named_parameters()`` order, right after ``torch.manual_seed(0)``.  Saved as ``theta/``.
* ``model(m, x, t) = m(x, t, encoder_hidden_states=context).sample`` with ``t`` an int64 [B]
  tensor (one timestep per example).  Default diffusers attention processor (SDPA).

Noise schedule (training)
-------------------------
``abar = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
num_train_timesteps=1000).alphas_cumprod`` (float32: betas = linspace(sqrt(0.00085),
sqrt(0.012), 1000, float32)**2, abar = cumprod(1 - betas) in float32).  Also stored as
``inputs.safetensors: alphas_cumprod`` [1000] so the Rust schedule can be checked bit for bit.

Building blocks (all float32; per-example ``t`` broadcast over C,H,W)
-------------------------------------------------------------------
* ``reduce(v)``: per example over all non-batch elements; "mean" (default) or "sum".
* ``e(m, x, n, t) = reduce((n - model(m, x, t))^2)`` -> [B].
* ``noise(x0, n, t) = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * n``  (sqrt taken in float32).
* ``w(t)``: "none" -> 1; "h2" -> h_t^2 with
  ``h_t = sqrt(1 - abar_prev) - sqrt(abar_prev / abar_t) * sqrt(1 - abar_t)``,
  ``prev = t - 1000 // S``, S = 4 sampling steps (so prev = t - 250), ``abar_prev = 1.0`` when
  prev < 0.  Evaluated in float32 from the float32 abar values.
* ``l(z)``: "logistic" softplus(-z) = log(1 + exp(-z)) (torch.nn.functional.softplus);
  "hinge" relu(1 - z); "correlation" 1 - z.
* beta = 2000.0 for all the brief's cases (read it from cases.json: three extra cases use a
  smaller beta, see CASES).  Final loss = mean over the batch of l(z_i).

Objectives
----------
* ``spin``: x_t = noise(x0_win, eps, t); eps2 = eps_lose ("independent", default) or eps
  ("shared"); x'_t = noise(x0_lose, eps2, t);
  D = [e(theta, x_t, eps, t) - e(theta_k, x_t, eps, t)] - [e(theta, x'_t, eps2, t) - e(theta_k, x'_t, eps2, t)];
  z = -beta * w(t) * D.
* ``spin-trajectory``: t_i = traj_timesteps[traj_index[i]]; x_t = noise(x0_win, eps, t_i);
  x'_i = traj_states[i, traj_index[i]];
  loser_i = reduce((model(theta_k, x'_i, t_i) - model(theta, x'_i, t_i))^2);
  D = [e(theta, x_t, eps, t_i) - e(theta_k, x_t, eps, t_i)] - loser; z = -beta * w(t_i) * D.
* ``spin-exact``: with tk = traj_timesteps[k] (same for the whole batch), nk = eps_steps[:, k],
  xk = noise(x0_win, nk, tk):
  z_i = -beta * sum_{k=0..3} w(tk) * ( [e(theta, xk, nk, tk) - e(theta_k, xk, nk, tk)]
        - reduce((model(theta_k, traj_states[:, k], tk) - model(theta, traj_states[:, k], tk))^2) ).
  Computed plainly with autograd (the Rust two-pass O(1)-memory method must give the same grad).
* ``dpo``: as ``spin`` with shared noise forced (eps2 = eps), x0_lose the real loser, and
  coefficient beta/2: z = -(beta / 2) * w(t) * D.
* ``sft``: loss = mean over the batch of e(theta, noise(x0_win, eps, t), eps, t)  (no l, no z).

Inputs (``inputs.safetensors``; drawn after theta's perturbation, in this order, from the same
generator: x0_win, x0_lose, context, eps, eps_lose, traj_states, eps_steps)
-----------------------------------------------------------------------------------------
x0_win [2,4,16,16], x0_lose [2,4,16,16], context [2,77,32], t int64 [2] = [37, 612],
eps [2,4,16,16], eps_lose [2,4,16,16], traj_timesteps int64 [4] = [751, 501, 251, 1]
(DDIM, 4 steps, ratio 250, steps_offset 1), traj_states [2,4,4,16,16] ([B, step, C, H, W]; state k
belongs to traj_timesteps[k]), traj_index int64 [2] = [1, 3], eps_steps [2,4,4,16,16],
alphas_cumprod [1000].  All float32 randn unless noted.

Expected tensors (``expected.safetensors``, float32)
--------------------------------------------------
Per case ``{name}``: ``.loss`` [1]; ``.z`` [B] (not for sft); ``.w`` ([B] for spin/dpo/
spin-trajectory, [4] = per schedule step for spin-exact; not for sft); ``.grad_norm`` [1] =
global L2 norm of all theta gradients, computed as clip_grad_norm_ does (L2 norm of the per-tensor
L2 norms); ``.grad.<key>`` for the three keys in PARAM_KEYS.
``at_reference.loss`` [1]: the default ``spin`` loss with theta = theta_k (must be log 2 exactly).
AdamW (``adamw.step{k}.*``, k = 0, 1, 2): starting from theta, objective = case ``spin``;
each step: zero grads, loss.backward(), grad_norm = clip_grad_norm_(params, 1.0) (pre-clip norm;
torch scales grads by min(1, 1.0 / (grad_norm + 1e-6))), AdamW.step() (lr 1e-3 base, betas
(0.9, 0.999), eps 1e-8, weight_decay 1e-2, torch's decoupled form: p *= 1 - lr*wd;
m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= (lr / (1 - b1^n)) * m / (sqrt(v) / sqrt(1 - b2^n) + eps),
n = 1, 2, 3 counting every step, including the lr = 0 one), then
get_linear_schedule_with_warmup(opt, 2, 10).step().  Recorded: ``.loss`` [1] (before the update),
``.lr`` [1] (the lr used by that step: 0, 5e-4, 1e-3), ``.grad_norm`` [1] (pre-clip),
``.param.<key>`` (value after the step) for the PARAM_KEYS.  theta_k stays tiny-a throughout.

Float64 noise floor: every case (and the AdamW run) is computed a second time with both models
``.double()``, inputs and abar cast to float64 (same schedule values); the relative differences
are printed and written to README.md.  Note diffusers computes the sinusoidal time embedding in
float32 even in a float64 model, so the float64 run is not "pure" float64 there.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO_ROOT, "worker", "tests", "fixtures")
TINY_A_UNET = os.path.join(FIXTURES, "tiny-a", "unet")
OUT = os.path.join(FIXTURES, "objectives")

SEED = 0
PERTURB_STD = 0.01
B = 2
BETA = 2000.0
SAMPLING_STEPS = 4
NUM_TRAIN_TIMESTEPS = 1000
T = [37, 612]
TRAJ_TIMESTEPS = [751, 501, 251, 1]
TRAJ_INDEX = [1, 3]

PARAM_KEYS = [
    "conv_in.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
    "up_blocks.1.resnets.0.conv1.weight",
]

DEFAULTS = dict(loss="logistic", weighting="none", noise="independent", reduction="mean")
CASES = [
    ("spin", "spin", {}),
    ("spin_hinge", "spin", {"loss": "hinge"}),
    ("spin_correlation", "spin", {"loss": "correlation"}),
    ("spin_h2", "spin", {"weighting": "h2"}),
    ("spin_shared", "spin", {"noise": "shared"}),
    ("spin_sum", "spin", {"reduction": "sum"}),
    ("spin_trajectory", "spin-trajectory", {}),
    ("spin_trajectory_h2", "spin-trajectory", {"weighting": "h2"}),
    ("spin_exact", "spin-exact", {}),
    ("spin_exact_h2", "spin-exact", {"weighting": "h2"}),
    ("dpo", "dpo", {"noise": "shared"}),
    ("sft", "sft", {}),
    ("sft_sum", "sft", {"reduction": "sum"}),
    # Extra cases (beyond the brief's list): with beta = 2000, spin-exact's z is ~150 here, so
    # the float32 logistic loss and every gradient underflow to exactly 0, and spin-trajectory's
    # z is ~15 (loss 1e-6).  These rerun them with beta chosen so that z = O(1) and the
    # gradients are informative.
    ("spin_trajectory_beta200", "spin-trajectory", {"beta": 200.0}),
    ("spin_exact_beta20", "spin-exact", {"beta": 20.0}),
    ("spin_exact_h2_beta20", "spin-exact", {"weighting": "h2", "beta": 20.0}),
]
EXTRA_CASES = {"spin_trajectory_beta200", "spin_exact_beta20", "spin_exact_h2_beta20"}

ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, max_grad_norm=1.0,
             warmup=2, total=10, steps=3)


def case_dicts() -> list[dict]:
    out = []
    for name, objective, opts in CASES:
        d = dict(name=name, objective=objective, **DEFAULTS, beta=BETA)
        d.update(opts)
        out.append(d)
    return out


# ---------------------------------------------------------------------------------------------
# Building blocks


def train_abar() -> torch.Tensor:
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=NUM_TRAIN_TIMESTEPS)
    abar = sched.alphas_cumprod.clone()
    assert abar.dtype == torch.float32 and abar.shape == (NUM_TRAIN_TIMESTEPS,)
    return abar


def model(m, x, t, ctx):
    return m(x, t, encoder_hidden_states=ctx).sample


def reduce(v: torch.Tensor, reduction: str) -> torch.Tensor:
    dims = tuple(range(1, v.dim()))
    if reduction == "mean":
        return v.mean(dim=dims)
    if reduction == "sum":
        return v.sum(dim=dims)
    raise ValueError(reduction)


def e(m, x, n, t, ctx, reduction):
    return reduce((n - model(m, x, t, ctx)) ** 2, reduction)


def noise(x0, n, t, abar):
    a = abar[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1.0 - a).sqrt() * n


def weight(t: torch.Tensor, kind: str, abar: torch.Tensor) -> torch.Tensor:
    if kind == "none":
        return torch.ones(t.shape, dtype=abar.dtype)
    if kind == "h2":
        prev = t - NUM_TRAIN_TIMESTEPS // SAMPLING_STEPS
        a = abar[t]
        a_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], torch.ones((), dtype=abar.dtype))
        h = (1.0 - a_prev).sqrt() - (a_prev / a).sqrt() * (1.0 - a).sqrt()
        return h * h
    raise ValueError(kind)


def lfun(z: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "logistic":
        return F.softplus(-z)
    if kind == "hinge":
        return F.relu(1.0 - z)
    if kind == "correlation":
        return 1.0 - z
    raise ValueError(kind)


def objective(case: dict, theta, theta_k, inp: dict, abar: torch.Tensor):
    """Returns (loss [scalar], z [B] or None, w or None)."""
    obj, red, beta = case["objective"], case["reduction"], case["beta"]
    ctx = inp["context"]

    def ref_e(x, n, t):
        with torch.no_grad():
            return e(theta_k, x, n, t, ctx, red)

    def ref_model(x, t):
        with torch.no_grad():
            return model(theta_k, x, t, ctx)

    if obj == "sft":
        t = inp["t"]
        xt = noise(inp["x0_win"], inp["eps"], t, abar)
        return e(theta, xt, inp["eps"], t, ctx, red).mean(), None, None

    if obj in ("spin", "dpo"):
        t = inp["t"]
        eps = inp["eps"]
        shared = obj == "dpo" or case["noise"] == "shared"
        eps2 = eps if shared else inp["eps_lose"]
        xt = noise(inp["x0_win"], eps, t, abar)
        xlt = noise(inp["x0_lose"], eps2, t, abar)
        win = e(theta, xt, eps, t, ctx, red) - ref_e(xt, eps, t)
        lose = e(theta, xlt, eps2, t, ctx, red) - ref_e(xlt, eps2, t)
        d = win - lose
        w = weight(t, case["weighting"], abar)
        coef = beta / 2.0 if obj == "dpo" else beta
        z = -coef * w * d
    elif obj == "spin-trajectory":
        idx = inp["traj_index"]
        ti = inp["traj_timesteps"][idx]
        eps = inp["eps"]
        xt = noise(inp["x0_win"], eps, ti, abar)
        xl = inp["traj_states"][torch.arange(B), idx]
        win = e(theta, xt, eps, ti, ctx, red) - ref_e(xt, eps, ti)
        loser = reduce((ref_model(xl, ti) - model(theta, xl, ti, ctx)) ** 2, red)
        d = win - loser
        w = weight(ti, case["weighting"], abar)
        z = -beta * w * d
    elif obj == "spin-exact":
        steps = inp["traj_timesteps"]
        acc = torch.zeros(B, dtype=abar.dtype)
        ws = []
        for k in range(steps.shape[0]):
            tk = steps[k].expand(B).contiguous()
            nk = inp["eps_steps"][:, k]
            xk = noise(inp["x0_win"], nk, tk, abar)
            sk = inp["traj_states"][:, k]
            win = e(theta, xk, nk, tk, ctx, red) - ref_e(xk, nk, tk)
            loser = reduce((ref_model(sk, tk) - model(theta, sk, tk, ctx)) ** 2, red)
            wk = weight(tk, case["weighting"], abar)
            ws.append(wk[0])
            acc = acc + wk * (win - loser)
        z = -beta * acc
        w = torch.stack(ws)
    else:
        raise ValueError(obj)
    return lfun(z, case["loss"]).mean(), z, w


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    # Exactly what torch.nn.utils.clip_grad_norm_ computes: norm of the per-tensor norms.
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def grads_of(m) -> dict[str, torch.Tensor]:
    out = {}
    for k, p in m.named_parameters():
        out[k] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
    return out


def run_case(case, theta_src, theta_k, inp, abar):
    theta = copy.deepcopy(theta_src)
    theta.requires_grad_(True)
    theta.zero_grad(set_to_none=True)
    loss, z, w = objective(case, theta, theta_k, inp, abar)
    loss.backward()
    g = grads_of(theta)
    return dict(loss=loss.detach(), z=None if z is None else z.detach(),
                w=None if w is None else w.detach(), grads=g,
                grad_norm=total_norm(list(g.values())))


def run_adamw(theta_src, theta_k, inp, abar, case):
    from transformers import get_linear_schedule_with_warmup

    theta = copy.deepcopy(theta_src)
    theta.requires_grad_(True)
    params = list(theta.parameters())
    opt = torch.optim.AdamW(params, lr=ADAMW["lr"], betas=ADAMW["betas"], eps=ADAMW["eps"],
                            weight_decay=ADAMW["weight_decay"])
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=ADAMW["warmup"],
                                            num_training_steps=ADAMW["total"])
    named = dict(theta.named_parameters())
    rec = []
    for _k in range(ADAMW["steps"]):
        lr = opt.param_groups[0]["lr"]
        opt.zero_grad(set_to_none=True)
        loss, z, _ = objective(case, theta, theta_k, inp, abar)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, ADAMW["max_grad_norm"])
        opt.step()
        sched.step()
        rec.append(dict(loss=loss.detach(), z=z.detach(), lr=lr, grad_norm=gn.detach(),
                        params={k: named[k].detach().clone() for k in PARAM_KEYS},
                        all_params={k: p.detach().clone() for k, p in named.items()}))
    return rec


# ---------------------------------------------------------------------------------------------


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b = float64 reference); 0 if both are 0."""
    a = a.double()
    b = b.double()
    den = b.abs().max().item()
    num = (a - b).abs().max().item()
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def fmt(v: float) -> str:
    return f"{v:.2e}"


def main() -> int:
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    torch.set_grad_enabled(True)
    os.makedirs(OUT, exist_ok=True)

    # Load before seeding so nothing in from_pretrained can consume the generator.
    theta_k = UNet2DConditionModel.from_pretrained(TINY_A_UNET, dtype=torch.float32).eval()
    theta_k.requires_grad_(False)
    for k in PARAM_KEYS:
        assert k in theta_k.state_dict(), k
    abar = train_abar()

    torch.manual_seed(SEED)
    theta = copy.deepcopy(theta_k).eval()
    with torch.no_grad():
        for _, p in theta.named_parameters():
            p.add_(PERTURB_STD * torch.randn_like(p))
    theta.requires_grad_(False)

    inp = {}
    inp["x0_win"] = torch.randn(B, 4, 16, 16)
    inp["x0_lose"] = torch.randn(B, 4, 16, 16)
    inp["context"] = torch.randn(B, 77, 32)
    inp["t"] = torch.tensor(T, dtype=torch.int64)
    inp["eps"] = torch.randn(B, 4, 16, 16)
    inp["eps_lose"] = torch.randn(B, 4, 16, 16)
    inp["traj_timesteps"] = torch.tensor(TRAJ_TIMESTEPS, dtype=torch.int64)
    inp["traj_states"] = torch.randn(B, len(TRAJ_TIMESTEPS), 4, 16, 16)
    inp["traj_index"] = torch.tensor(TRAJ_INDEX, dtype=torch.int64)
    inp["eps_steps"] = torch.randn(B, len(TRAJ_TIMESTEPS), 4, 16, 16)

    # Sanity: the DDIM schedule (4 steps, leading, steps_offset 1) is [751, 501, 251, 1].
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1)
    ddim.set_timesteps(SAMPLING_STEPS)
    assert ddim.timesteps.tolist() == TRAJ_TIMESTEPS, ddim.timesteps
    assert torch.equal(ddim.alphas_cumprod, abar)

    theta.save_pretrained(os.path.join(OUT, "theta"), safe_serialization=True)
    # Drop the machine-specific absolute source path diffusers carries over into config.json.
    cfg_path = os.path.join(OUT, "theta", "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.pop("_name_or_path", None)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    # Round-trip check: the saved theta is what we train from.
    reloaded = UNet2DConditionModel.from_pretrained(os.path.join(OUT, "theta"), dtype=torch.float32)
    for (k1, v1), (k2, v2) in zip(theta.state_dict().items(), reloaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    del reloaded

    inputs_file = {k: v.contiguous() for k, v in inp.items()}
    inputs_file["alphas_cumprod"] = abar.contiguous()
    save_file(inputs_file, os.path.join(OUT, "inputs.safetensors"))

    cases = case_dicts()
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(cases, f, indent=2)
        f.write("\n")

    # float64 copies
    theta64 = copy.deepcopy(theta).double()
    theta_k64 = copy.deepcopy(theta_k).double()
    inp64 = {k: (v.double() if v.is_floating_point() else v) for k, v in inp.items()}
    abar64 = abar.double()

    expected: dict[str, torch.Tensor] = {}
    floor = []  # rows for README

    # at_reference: theta = theta_k => D = 0 exactly => logistic loss = log 2 exactly.
    spin_case = cases[0]
    assert spin_case["name"] == "spin"
    ref32 = run_case(spin_case, theta_k, theta_k, inp, abar)
    log2_32 = torch.tensor(math.log(2.0), dtype=torch.float32)
    assert torch.equal(ref32["z"].abs(), torch.zeros(B)), ref32["z"]
    assert ref32["loss"].item() == log2_32.item(), (ref32["loss"].item(), log2_32.item())
    ref64 = run_case(spin_case, theta_k64, theta_k64, inp64, abar64)
    assert ref64["loss"].item() == math.log(2.0), ref64["loss"].item()
    expected["at_reference.loss"] = ref32["loss"].reshape(1)
    print(f"at_reference: spin logistic loss with theta = theta_k = {ref32['loss'].item()!r} "
          f"== log 2 (float32 and float64): OK")

    print()
    hdr = (f"{'case':20s} {'loss':>14s} {'z':>30s} {'grad_norm':>12s} | rel64: "
           f"{'loss':>8s} {'z':>8s} {'gnorm':>8s} {'grad3':>8s} {'allgrad':>8s}")
    print(hdr)
    for case in cases:
        name = case["name"]
        r32 = run_case(case, theta, theta_k, inp, abar)
        r64 = run_case(case, theta64, theta_k64, inp64, abar64)
        expected[f"{name}.loss"] = r32["loss"].reshape(1)
        if r32["z"] is not None:
            expected[f"{name}.z"] = r32["z"].contiguous()
            expected[f"{name}.w"] = r32["w"].float().contiguous()
        expected[f"{name}.grad_norm"] = r32["grad_norm"].reshape(1)
        for k in PARAM_KEYS:
            expected[f"{name}.grad.{k}"] = r32["grads"][k].contiguous()

        d_loss = rel(r32["loss"], r64["loss"])
        d_z = rel(r32["z"], r64["z"]) if r32["z"] is not None else None
        d_gn = rel(r32["grad_norm"], r64["grad_norm"])
        d_g3 = max(rel(r32["grads"][k], r64["grads"][k]) for k in PARAM_KEYS)
        g32 = torch.cat([v.double().flatten() for v in r32["grads"].values()])
        g64 = torch.cat([v.flatten() for v in r64["grads"].values()])
        gden = g64.norm().item()
        d_all = (g32 - g64).norm().item() / gden if gden > 0 else 0.0
        zs = "-" if r32["z"] is None else ", ".join(f"{v:.6g}" for v in r32["z"].tolist())
        print(f"{name:20s} {r32['loss'].item():14.8g} {zs:>30s} {r32['grad_norm'].item():12.6g} |"
              f"        {fmt(d_loss)} {fmt(d_z) if d_z is not None else '-':>8s} {fmt(d_gn)} "
              f"{fmt(d_g3)} {fmt(d_all)}")
        floor.append(dict(name=name, loss=r32["loss"].item(), z=None if r32["z"] is None
                          else r32["z"].tolist(), w=None if r32["w"] is None else r32["w"].tolist(),
                          grad_norm=r32["grad_norm"].item(), d_loss=d_loss, d_z=d_z, d_gn=d_gn,
                          d_g3=d_g3, d_all=d_all, loss64=r64["loss"].item(),
                          gn64=r64["grad_norm"].item()))

    # AdamW
    rec32 = run_adamw(theta, theta_k, inp, abar, spin_case)
    rec64 = run_adamw(theta64, theta_k64, inp64, abar64, spin_case)
    print()
    print("adamw (objective = case spin)")
    adam_rows = []
    for k, (a, b) in enumerate(zip(rec32, rec64)):
        expected[f"adamw.step{k}.loss"] = a["loss"].reshape(1)
        expected[f"adamw.step{k}.z"] = a["z"].contiguous()
        expected[f"adamw.step{k}.lr"] = torch.tensor([a["lr"]], dtype=torch.float32)
        expected[f"adamw.step{k}.grad_norm"] = a["grad_norm"].reshape(1).float()
        for key in PARAM_KEYS:
            expected[f"adamw.step{k}.param.{key}"] = a["params"][key].contiguous()
        # param deviation vs float64, in absolute terms and in units of the base lr
        dmax = max((a["all_params"][n].double() - b["all_params"][n]).abs().max().item()
                   for n in a["all_params"])
        dmax3 = max((a["params"][n].double() - b["params"][n]).abs().max().item()
                    for n in PARAM_KEYS)
        row = dict(step=k, loss=a["loss"].item(), z=a["z"].tolist(), lr=a["lr"], grad_norm=a["grad_norm"].item(),
                   d_loss=rel(a["loss"], b["loss"]), d_gn=rel(a["grad_norm"], b["grad_norm"]),
                   dparam3=dmax3, dparam_all=dmax)
        adam_rows.append(row)
        print(f"  step{k}: loss {row['loss']:.8g} z {row['z']} lr {row['lr']:.6g} grad_norm(pre-clip) "
              f"{row['grad_norm']:.6g} | rel64 loss {fmt(row['d_loss'])} gnorm {fmt(row['d_gn'])}"
              f" | max|param32-param64| 3 keys {fmt(dmax3)}, all {fmt(dmax)}")

    expected = {k: v.detach().to(torch.float32).contiguous() for k, v in expected.items()}
    save_file(expected, os.path.join(OUT, "expected.safetensors"))

    write_readme(cases, floor, adam_rows, expected, inputs_file)

    sizes = {}
    for root, _, files in os.walk(OUT):
        for fn in files:
            p = os.path.join(root, fn)
            sizes[os.path.relpath(p, OUT)] = os.path.getsize(p)
    print()
    for k in sorted(sizes):
        print(f"  {k:45s} {sizes[k]:>9d} bytes")
    return 0


def versions() -> str:
    import diffusers
    import safetensors
    import transformers

    return (f"Python {platform.python_version()}, torch {torch.__version__} (CPU, "
            f"{torch.get_num_threads()} threads), diffusers {diffusers.__version__}, "
            f"transformers {transformers.__version__}, safetensors {safetensors.__version__}")


def write_readme(cases, floor, adam_rows, expected, inputs_file) -> None:
    L = []
    A = L.append
    A("# Objective fixtures (generated -- do not edit by hand)")
    A("")
    A("Written by `scripts/make_objective_fixtures.py` (run `python scripts/make_objective_fixtures.py`")
    A("from the repository root; CPU only, deterministic, `torch.manual_seed(0)`). The script's")
    A("docstring is the normative spec; this page summarises it.")
    A("")
    A(f"Generated with: {versions()}.")
    A("")
    A("## Files")
    A("")
    A("| path | what |")
    A("|---|---|")
    A("| `theta/` | theta: `UNet2DConditionModel.save_pretrained(.., safe_serialization=True)` of tiny-a's UNet with every parameter `+= 0.01 * randn_like` (in `named_parameters()` order, first draws after `torch.manual_seed(0)`). |")
    A("| `inputs.safetensors` | the batch, see below. |")
    A("| `cases.json` | list of `{name, objective, loss, weighting, noise, reduction, beta}`. `sft` cases carry the (ignored) defaults for loss/weighting/noise. |")
    A("| `expected.safetensors` | reference results (float32), see below. |")
    A("")
    A("theta_k (the frozen reference / opponent) is `../tiny-a/unet` itself.")
    A("")
    A("## Inputs (`inputs.safetensors`)")
    A("")
    A("| name | dtype | shape | value |")
    A("|---|---|---|---|")
    descr = {
        "x0_win": "randn (winner latents)",
        "x0_lose": "randn (loser latents: opponent sample for spin, real loser for dpo)",
        "context": "randn (encoder_hidden_states)",
        "t": f"{T}",
        "eps": "randn (winner noise)",
        "eps_lose": "randn (loser noise, 'independent')",
        "traj_timesteps": f"{TRAJ_TIMESTEPS} (DDIM 4 steps, leading, steps_offset 1)",
        "traj_states": "randn, [B, step k, C, H, W]: opponent DDIM state x'_{t_k}, t_k = traj_timesteps[k]",
        "traj_index": f"{TRAJ_INDEX} (spin-trajectory: which schedule step each example uses)",
        "eps_steps": "randn, [B, step k, C, H, W]: winner noise for schedule step k (spin-exact)",
        "alphas_cumprod": "training schedule abar (diffusers DDPMScheduler, float32), for checking",
    }
    for k, v in inputs_file.items():
        A(f"| `{k}` | {str(v.dtype).replace('torch.', '')} | {list(v.shape)} | {descr[k]} |")
    A("")
    A("Random tensors are drawn in the order x0_win, x0_lose, context, eps, eps_lose, traj_states,")
    A("eps_steps (after theta's perturbation).")
    A("")
    A("## Formulas")
    A("")
    A("```")
    A("model(m, x, t) = m(x, t, encoder_hidden_states=context).sample     t: int64 [B]")
    A("reduce(v)      = per example over C,H,W: mean (\"mean\", default) | sum (\"sum\")")
    A("e(m, x, n, t)  = reduce((n - model(m, x, t))^2)                     -> [B]")
    A("noise(x0,n,t)  = sqrt(abar_t) x0 + sqrt(1 - abar_t) n                (per-example t)")
    A("abar           = DDPMScheduler(0.00085, 0.012, scaled_linear, 1000).alphas_cumprod (float32)")
    A("w(t)           = 1 (\"none\") | h_t^2 (\"h2\"),")
    A("                 h_t = sqrt(1-abar_prev) - sqrt(abar_prev/abar_t) sqrt(1-abar_t),")
    A("                 prev = t - 1000//4 = t - 250, abar_prev = 1 if prev < 0   (float32)")
    A("l(z)           = softplus(-z) (\"logistic\") | relu(1 - z) (\"hinge\") | 1 - z (\"correlation\")")
    A("beta           = cases.json (2000 except the extra cases);   loss = mean_i l(z_i)")
    A("")
    A("spin:            x_t = noise(x0_win, eps, t); eps2 = eps_lose (independent) | eps (shared)")
    A("                 x'_t = noise(x0_lose, eps2, t)")
    A("                 D = [e(th, x_t, eps, t) - e(thk, x_t, eps, t)] - [e(th, x'_t, eps2, t) - e(thk, x'_t, eps2, t)]")
    A("                 z = -beta w(t) D")
    A("spin-trajectory: t_i = traj_timesteps[traj_index[i]]; x_t = noise(x0_win, eps, t_i)")
    A("                 x'_i = traj_states[i, traj_index[i]]")
    A("                 loser_i = reduce((model(thk, x'_i, t_i) - model(th, x'_i, t_i))^2)")
    A("                 D = [e(th, x_t, eps, t_i) - e(thk, x_t, eps, t_i)] - loser;  z = -beta w(t_i) D")
    A("spin-exact:      tk = traj_timesteps[k] (whole batch), nk = eps_steps[:, k], xk = noise(x0_win, nk, tk)")
    A("                 z_i = -beta sum_{k=0..3} w(tk) ( [e(th, xk, nk, tk) - e(thk, xk, nk, tk)]")
    A("                        - reduce((model(thk, traj_states[:, k], tk) - model(th, traj_states[:, k], tk))^2) )")
    A("dpo:             spin with eps2 = eps forced, x0_lose = real loser, z = -(beta/2) w(t) D")
    A("sft:             loss = mean_i e(th, noise(x0_win, eps, t), eps, t)     (no z, no l)")
    A("```")
    A("")
    A("`at_reference`: with theta = theta_k the default `spin` loss is exactly log 2 (asserted in")
    A("float32 and float64; stored as `at_reference.loss`).")
    A("")
    A("## Expected tensors (`expected.safetensors`, all float32)")
    A("")
    A("Parameter keys used (all exist in tiny-a):")
    A("")
    for k in PARAM_KEYS:
        shape = list(expected[f"spin.grad.{k}"].shape)
        A(f"- `{k}` {shape}")
    A("")
    A("| name | shape | what |")
    A("|---|---|---|")
    A("| `{case}.loss` | [1] | final loss |")
    A("| `{case}.z` | [2] | argument of l (not for sft) |")
    A("| `{case}.w` | [2] or [4] | w(t) per example; for spin-exact w(t_k) per schedule step (not for sft) |")
    A("| `{case}.grad_norm` | [1] | global L2 norm of all theta grads (= norm of per-tensor norms, as clip_grad_norm_) |")
    A("| `{case}.grad.<key>` | param shape | d loss / d param for the three keys |")
    A("| `at_reference.loss` | [1] | log 2 |")
    A("| `adamw.step{k}.loss` | [1] | spin loss before step k (k = 0, 1, 2) |")
    A("| `adamw.step{k}.z` | [2] | z of step k's loss (extra, for diagnosis) |")
    A("| `adamw.step{k}.lr` | [1] | lr used by step k: 0, 5e-4, 1e-3 |")
    A("| `adamw.step{k}.grad_norm` | [1] | pre-clip global grad norm of step k |")
    A("| `adamw.step{k}.param.<key>` | param shape | parameter value after step k |")
    A("")
    A("AdamW run: start from theta (theta_k stays tiny-a), objective = case `spin`, 3 steps of:")
    A("`loss.backward()`; `clip_grad_norm_(params, 1.0)` (scales grads by `min(1, 1/(norm + 1e-6))`);")
    A("`AdamW(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2).step()`;")
    A("`get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=10).step()`.")
    A("torch AdamW: `p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;")
    A("p -= lr/(1-b1^n) * m / (sqrt(v)/sqrt(1-b2^n) + eps)` with n = 1, 2, 3 -- step 0 has lr 0")
    A("(params unchanged) but still advances m, v and n.")
    A("")
    A("## Values")
    A("")
    A("| case | objective | loss | z | grad_norm |")
    A("|---|---|---|---|---|")
    obj = {c["name"]: c for c in cases}
    for r in floor:
        zs = "-" if r["z"] is None else ", ".join(f"{v:.7g}" for v in r["z"])
        c = obj[r["name"]]
        opts = ", ".join(f"{k}={c[k]}" for k in DEFAULTS if c[k] != DEFAULTS[k])
        if c["beta"] != BETA:
            opts += (", " if opts else "") + f"beta={c['beta']:g}"
        A(f"| {r['name']} | {c['objective']}{(' (' + opts + ')') if opts else ''} | {r['loss']:.8g} | {zs} | {r['grad_norm']:.7g} |")
    A("")
    A("| AdamW step | loss | z | lr | grad_norm (pre-clip) |")
    A("|---|---|---|---|---|")
    for r in adam_rows:
        zs = ", ".join(f"{v:.7g}" for v in r["z"])
        A(f"| {r['step']} | {r['loss']:.8g} | {zs} | {r['lr']:.6g} | {r['grad_norm']:.7g} |")
    A("")
    A("Saturation notes (read before writing tests):")
    A("")
    A("- With beta = 2000 the `spin_exact*` z's are ~150, so in float32 softplus(-z) and its")
    A("  derivative sigmoid(-z) underflow: loss and every gradient are **exactly 0** (float64 gives")
    A("  ~1e-66). Those two cases only check z and that nothing blows up; the extra cases")
    A("  `spin_exact_beta20` / `spin_exact_h2_beta20` (beta 20, z = O(1)) carry the real gradient")
    A("  check for the two-pass method. Likewise `spin_trajectory` (z ~ 15, loss ~1e-6, relative")
    A("  float32 noise ~1e-4) is complemented by `spin_trajectory_beta200`.")
    A("- `spin_hinge` and `spin_correlation` coincide (both z < 1, so hinge = 1 - z).")
    A("- AdamW: step 0 has lr 0 so step 1 sees the same params (same loss / grad norm). Step 1 is")
    A("  Adam's bias-corrected first real move, ~lr * sign(g) = 5e-4 on every parameter; after it")
    A("  the z's are large and positive, so step 2's float32 loss and gradients are exactly 0 and")
    A("  step 2 moves the parameters by momentum (m, v decayed, weight decay) alone.")
    A("")
    A("## Float32 noise floor (float32 result vs the same computation in float64)")
    A("")
    A("Relative differences `max|x32 - x64| / max|x64|` per tensor; `grad3` is the worst of the")
    A("three recorded gradients; `all grads` is `||g32 - g64|| / ||g64||` over every parameter.")
    A("A Rust float32 implementation will differ from these fixtures by roughly this much (its")
    A("summation order differs from torch's), so test tolerances should sit a decade or so above.")
    A("")
    A("| case | loss | z | grad_norm | grad3 | all grads |")
    A("|---|---|---|---|---|---|")
    for r in floor:
        if r["loss"] == 0.0 and r["grad_norm"] == 0.0:
            A(f"| {r['name']} | float32 underflow: loss 0 (f64 {r['loss64']:.1e}) | "
              f"{fmt(r['d_z'])} | 0 (f64 {r['gn64']:.1e}) | 0 | 0 |")
            continue
        A(f"| {r['name']} | {fmt(r['d_loss'])} | {fmt(r['d_z']) if r['d_z'] is not None else '-'} | "
          f"{fmt(r['d_gn'])} | {fmt(r['d_g3'])} | {fmt(r['d_all'])} |")
    A("")
    A("| AdamW step | loss | grad_norm | max abs param diff (3 keys) | max abs param diff (all) |")
    A("|---|---|---|---|---|")
    for r in adam_rows:
        if r["loss"] == 0.0:
            A(f"| {r['step']} | float32 underflow: 0 | 0 | {fmt(r['dparam3'])} | {fmt(r['dparam_all'])} |")
            continue
        A(f"| {r['step']} | {fmt(r['d_loss'])} | {fmt(r['d_gn'])} | {fmt(r['dparam3'])} | {fmt(r['dparam_all'])} |")
    A("")
    A("Max abs param diff is absolute (lr is 5e-4 / 1e-3): Adam's m/(sqrt(v)+eps) amplifies the")
    A("relative noise of near-zero gradient elements, so compare AdamW params with an absolute")
    A("tolerance of ~1e-4 rather than a relative one.")
    A("")
    A("(diffusers computes the sinusoidal time embedding in float32 even for a float64 model, so the")
    A("float64 run shares that rounding with float32.)")
    A("")
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write("\n".join(L))


if __name__ == "__main__":
    sys.exit(main())
