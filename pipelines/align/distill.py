"""The Fast student: reflow distillation on guided teacher couplings.

**Method.** The teacher (the ``rlhf`` model) samples ``trajectories_per_prompt``
clips per training prompt with Heun and classifier-free guidance from recorded
noise: couplings ``(x1 = noise, x0 = teacher(x1, prompt))``. The student, initialised
from the teacher, is trained by rectified-flow regression on the straight line
between them: at ``x_t = (1 - t) x0 + t x1`` it predicts ``x1 - x0`` from the prompt
alone (no unconditional branch). This is *reflow* (Liu et al., Rectified Flow) used
as distillation, as in InstaFlow: paths that are straight make Euler exact at any
step count, so one network serves 4 and 8 steps, and the guided teacher's endpoint
is what it learns, so guidance is distilled in and every student step is one
network evaluation. ``t`` is drawn from the times the student is sampled at (the
shifted schedules of ``student_steps``, whose union is the 8-step grid).

**Why this one, for a CPU in minutes.** DMD2 trains a second "fake score" network and
a GAN head beside the student and needs many alternating updates to be stable;
consistency / trajectory-segmented consistency distillation bootstraps from an EMA
target and needs the teacher's ODE solved between neighbouring times at every step;
shortcut models need a step-size input the DiT does not have. Reflow needs one
teacher pass over a fixed noise set up front (cheap: a batched, no-gradient sampler
run) and then plain regression, which converges in a few hundred steps of the
``tiny`` DiT. The cost is that quality is bounded by how well a few hundred
couplings cover the prompts, which the test measures with the probes.
"""

from __future__ import annotations

import torch

from model.dit import TextConditioning
from model.samplers import Conditioning, Guidance, sample
from pipelines.align.sampling import encode_prompts, latent_shapes, sampling_times
from pipelines.train.batches import pad_text


class CouplingRow:
    def __init__(self, index: int):
        self.clip_id = f"coupling{index:05d}"
        self.bucket = 0


def student_grid(mcfg, v_shape, a_shape, student_steps) -> list[float]:
    """Sorted distinct times (> 0) at which the student is evaluated for its step counts."""

    times = set()
    for n in student_steps:
        times.update(round(t, 6) for t in sampling_times(mcfg, v_shape, a_shape, n)[:-1])
    return sorted(times, reverse=True)


@torch.no_grad()
def teacher_couplings(pipeline, prompts: list[str], s, seed: int, batch: int = 16) -> dict:
    """(noise, guided teacher sample) pairs for every prompt x trajectory."""

    mcfg = pipeline.config
    pipeline.eval()
    device = pipeline.device
    v_shape, a_shape, _ = latent_shapes(mcfg, s.duration_s)
    times = torch.tensor(sampling_times(mcfg, v_shape, a_shape, s.teacher_steps))
    tokens, mask = encode_prompts(pipeline, prompts)
    jobs = [(p, k) for p in range(len(prompts)) for k in range(s.trajectories_per_prompt)]
    out = {"noise_video": [], "noise_audio": [], "video": [], "audio": [], "prompt": []}
    gen = torch.Generator().manual_seed(seed * 7919 + 17)
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        b = len(chunk)
        nv = torch.randn((b, *v_shape[1:]), generator=gen)
        na = torch.randn((b, *a_shape[1:]), generator=gen)
        rows = [tokens[p][mask[p]] for p, _ in chunk]
        t, m, _ = pad_text(rows, None, tokens.shape[1])
        cond = Conditioning(text=TextConditioning(t.to(device), m.to(device)))
        v, a = sample(
            pipeline.dit, nv.to(device), na.to(device), cond, times, "heun",
            Guidance(s.text_scale, 1.0),
        )  # fmt: skip
        out["noise_video"].append(nv)
        out["noise_audio"].append(na)
        out["video"].append(v.cpu())
        out["audio"].append(a.cpu())
        out["prompt"].append(torch.tensor([p for p, _ in chunk]))
    return {k: torch.cat(v).contiguous() for k, v in out.items()}


def reflow_loss(module, couplings, indices, tokens, mask, grid, gen, device, max_tokens):
    idx = torch.as_tensor(indices, dtype=torch.long)
    x1v, x1a = couplings["noise_video"][idx], couplings["noise_audio"][idx]
    x0v, x0a = couplings["video"][idx], couplings["audio"][idx]
    prompts = couplings["prompt"][idx].tolist()
    pick = torch.randint(0, len(grid), (len(indices),), generator=gen)
    t = torch.tensor([grid[i] for i in pick.tolist()])
    tv = t.view(-1, 1, 1, 1, 1)
    ta = t.view(-1, 1, 1)
    xv = (1 - tv) * x0v + tv * x1v
    xa = (1 - ta) * x0a + ta * x1a
    rows = [tokens[p][mask[p]] for p in prompts]
    tk, m, _ = pad_text(rows, None, tokens.shape[1])
    text = TextConditioning(tk.to(device), m.to(device))
    pred_v, pred_a = module(xv.to(device), xa.to(device), t.to(device), text)
    loss_v = torch.mean((pred_v.float() - (x1v - x0v).to(device)) ** 2)
    loss_a = torch.mean((pred_a.float() - (x1a - x0a).to(device)) ** 2)
    loss = loss_v + loss_a
    tokens_per = pred_v[0, 0].numel() // 4 + pred_a.shape[-1]
    return (
        loss,
        {"video_loss": float(loss_v.detach()), "audio_loss": float(loss_a.detach())},
        int(tokens_per),
    )
