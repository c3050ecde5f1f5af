"""Old vs new decoders, side by side in one run (issue 22).

    python -m bench.decoders [--checkpoint URI] [--clips 2] [--lines 6] [--vocoder-steps 4000]
        [--vocoder URI] [--video-steps 40] [--video-lr 5e-5] [--video-plain URI --video-adv URI]
        [--video-variants 0,3] [--video-scratch 24,48,8] [--video-batch 8] [--device cuda]

Audio, two tables.

* Synthetic-world clips (``core.synth``, at the checkpoint's size and rates), decoded
  from their own mel spectrograms (the vocoder alone) by Griffin-Lim as it was (a
  random phase per stereo channel), Griffin-Lim with one shared phase, and the
  neural vocoder: mel L1, multi-resolution STFT distance, worst onset error in video
  frames, L/R correlation next to the original's, decode seconds per output second.
* Talking-avatar lines (``core.synth.speech``: espeak-ng, known text), each heard
  through Duet's own WhisperX stage (``curation.speech``) as the original waveform,
  from its own mel (Griffin-Lim / vocoder) and through the audio VAE (encode, decode
  the mel, then Griffin-Lim / vocoder): word error rate against the known text
  (``curation.speech.word_error_rate``), MR-STFT distance, worst onset error, L/R
  correlation, decode seconds per output second (VAE decode included).

``--audio-scratch 16@64-96,32@128-256`` also trains fresh audio VAEs (latent channels
@ level widths; each level halves the latent rate) for ``--audio-steps`` on the synthetic
clips and the talking-avatar sentences that are not scored, by the vae stage's audio
settings, and hears the scored lines through each with the same vocoder: what an audio
VAE of that shape can keep of speech, apart from what the checkpoint's corpus taught it.

The vocoder is ``--vocoder`` (a standalone vocoder checkpoint), else the
checkpoint's if it uses a trained one, else one trained here for
``--vocoder-steps`` by the vae stage's recipe and code (random segments, mel + STFT
losses, then the GAN) on the clips and on other sentences than the ones scored: the
WER lines are held out from its training.

Video: the checkpoint's video VAE, then plain and adversarially trained ones.
``--video-plain`` / ``--video-adv`` name checkpoints (their video VAEs are used);
otherwise four are fine-tuned here from the checkpoint's for ``--video-steps`` on
the same windows of other synthetic clips with the vae stage's settings (variants
0-3, ``--video-variants`` picks): its loss, its loss with the standout weighting on
(still objects up-weighted), its loss with the patch discriminator
(``model.discriminators``) from ``--video-gan-start``, and its loss on windows whose
colour channels are permuted (``vae.colour_permute``). ``--video-scratch W1,W2,C``
trains fresh VAEs of those widths and latent channels instead of fine-tuning. Per
VAE: PSNR, SSIM, decode seconds per output second and object retention per colour
through the probes (a colour found in an original's median frame found in its
reconstruction's, as bench/vae_objects.py counts it), on ``--video-clips`` held-out
clips, and on a palette sweep (every object colour on every backdrop at two sizes,
still squares: 12 per colour). The checkpoint's VAE is also decoded in tiles
(temporal chunks and 8-latent-pixel tiles) with the largest tiled-vs-whole
difference.
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import io
import time


def _corr(a, b) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / max(float(a.norm() * b.norm()), 1e-12))


def _ssim(x, y) -> float:
    """Mean SSIM of frames (T, 3, H, W) in [0, 1] (Gaussian window 11, sigma 1.5)."""
    import torch
    import torch.nn.functional as F

    g = torch.exp(-((torch.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    g = (g / g.sum()).to(x)
    win = (g[:, None] * g[None]).expand(3, 1, 11, 11)

    def blur(v):
        return F.conv2d(v, win, groups=3)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def _onset_error(truth_audio, out_audio, sample_rate: int, frame_s: float) -> float | None:
    """Worst distance (video frames) from an original onset to the nearest decoded one."""
    from core.probes.onsets import detect_onsets

    truth = detect_onsets(truth_audio, sample_rate)
    found = detect_onsets(out_audio, sample_rate)
    if not truth:
        return None
    return max(min((abs(t - f) for f in found), default=9.9) / frame_s for t in truth)


def _synth_clips(cfg, seeds, seconds: float, spl: int, kinds: tuple[str, ...] = ()):
    """(frames cut to the latent grid, stereo audio cut to whole latents) per seed."""
    import numpy as np
    import torch

    from core.synth.corpus import SynthConfig, generate_video

    synth = SynthConfig(
        width=cfg.width, height=cfg.height, fps=cfg.fps, sample_rate=cfg.sample_rate,
        min_shots=1, max_shots=1, min_shot_s=seconds, max_shot_s=seconds,
        **({"kinds": tuple(kinds)} if kinds else {}),
    )  # fmt: skip
    tf = cfg.video_vae.temporal_factor
    out = []
    for seed in seeds:
        clip, _ = generate_video(seed, synth)
        n = 1 + tf * ((len(clip.frames) - 1) // tf)
        audio = torch.from_numpy(np.ascontiguousarray(clip.audio, dtype=np.float32))
        out.append((clip.frames[:n], audio[:, : audio.shape[1] // spl * spl]))
    return out


def _kinds(args) -> tuple[str, ...]:
    """``--kinds`` as a tuple (empty: every scene kind, the talking avatar included)."""
    return tuple(k.strip() for k in args.kinds.split(",") if k.strip())


def _speech_lines(indices, sample_rate: int, spl: int):
    """Talking-avatar lines: (text, stereo waveform) with the avatar's sentences and
    voices, panned (right at 0.6 of left) and padded to whole audio latents."""
    import numpy as np
    import torch

    from core.synth.speech import SENTENCES, VOICES, synthesize_sentence

    lines = []
    for i in indices:
        text = SENTENCES[i % len(SENTENCES)]
        rng = np.random.default_rng(i)
        track = synthesize_sentence(
            text.split(), sample_rate, rng, 0.3, VOICES[i % len(VOICES)], 150, 50
        )
        n = track.audio.shape[0] + int(0.3 * sample_rate)
        mono = np.zeros(n + (-n) % spl, np.float32)
        mono[: track.audio.shape[0]] = track.audio
        lines.append((text, torch.from_numpy(np.stack([mono, 0.6 * mono]))))
    return lines


def _train_vocoder(pipe, waveforms, steps: int, gan_fraction: float, gan_weight: float, device):
    """The vocoder trained here by the vae stage's own recipe and code
    (``pipelines.train.loop.vocoder_loss`` with a ``VAEStageConfig`` of ``steps`` steps,
    its segments and GAN window, its AdamW, rate schedule, grad clip and per-step
    seeded generator); only the VAEs' losses are left out. Each step one random
    waveform stands for the stage's batch of clips: the stage draws its segments
    (4 x 1 s mono) from it, mel + MR-STFT losses, the GAN for the last
    ``gan_fraction`` of steps at ``gan_weight``.

    Why this recipe (2-vCPU runs, MR-STFT on 2 clips / 4 held-out lines, Griffin-Lim
    1.108 / 1.235): one whole waveform a step with the GAN at full weight from 70% of
    500 steps left it at 1.28 on the clips; 600 such steps on clips and speech, GAN
    last 10% at 0.1, 1.55. Batched segments, mel + STFT only: 1.26 / 1.31 at 1000
    steps, 1.10 / 1.10 at 2500, 1.02 / 1.04 at 5000 (0.04 s a step). A GAN step costs
    ~1 s on CPU (the discriminators), so it comes last and light."""
    import torch

    from model.discriminators import AudioDiscriminator
    from pipelines.train.config import VAEStageConfig
    from pipelines.train.loop import lr_at, step_generator, vocoder_gan_start, vocoder_loss

    s = VAEStageConfig(
        steps=steps, vocoder_steps=steps, vocoder_gan_fraction=gan_fraction,
        vocoder_gan_weight=gan_weight,
    )  # fmt: skip
    torch.manual_seed(0)
    vocoder = type(pipe.vocoder)(pipe.config.audio_vae).to(device).train()
    disc = AudioDiscriminator().to(device) if 0 <= vocoder_gan_start(s) < steps else None
    groups = [{"params": list(vocoder.parameters()), "lr": s.audio_lr}]
    if disc is not None:
        groups.append({"params": list(disc.parameters()), "lr": s.disc_lr})
    opt = torch.optim.AdamW(groups, weight_decay=s.weight_decay, betas=(0.9, 0.99))
    base = [g["lr"] for g in groups]
    params = [p for g in groups for p in g["params"]]
    started = time.perf_counter()
    for step in range(steps):
        for g, lr in zip(opt.param_groups, base, strict=True):
            g["lr"] = lr_at(step, steps, lr, s.warmup_steps)
        gen = step_generator(0, "vae", step, 0)
        w = waveforms[int(torch.randint(len(waveforms), (1,), generator=gen))]
        loss, _ = vocoder_loss(vocoder, disc, pipe.audio_vae, w[None].to(device), s, gen, step)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
    print(
        f"vocoder training (vae stage recipe): {steps} steps, {time.perf_counter() - started:.0f} s"
    )
    return vocoder.eval()


STANDOUT = 10.0  # the standout weight of the fine-tune that turns it on
PERMUTE = 0.5  # the colour-permutation probability of the fine-tune that turns it on


def _finetune_video_vaes(
    vae,
    train_clips,
    steps,
    gan_start,
    lr,
    device,
    only=(),
    scratch=None,
    batch_size=2,
    decoder_only=False,
):
    """Copies of ``vae`` fine-tuned on identical windows and noise with the vae
    stage's settings but ``lr``: the stage's loss, the stage's loss with the standout
    weighting on (``vae.standout_weight``: still objects up-weighted), and the
    stage's loss with the patch discriminator from ``gan_start``, and the stage's loss
    on windows whose colours are permuted (``vae.colour_permute``). ``only``: indices
    of the variants to run (empty: all). A fresh AdamW at the stage's 5e-4 knocks the
    trained VAE down (one step: 31.5 -> 12.3 dB; 20 warm-up steps: 26.4 dB), hence a
    smaller rate. ``scratch`` (a VideoVAEConfig): train fresh VAEs of that config
    instead of copies of ``vae`` (then the stage's rate suits). ``decoder_only``: the
    encoder stays frozen, so the latents (and a generator trained on them) stay valid
    (``vae.decoders_only``)."""
    import torch

    from model.discriminators import PatchDiscriminator
    from model.video_vae import VideoVAE, frames_to_tensor
    from pipelines.train.config import VAEStageConfig
    from pipelines.train.loop import lr_at, permute_colours, recon_weights

    s = VAEStageConfig()
    tf = vae.cfg.temporal_factor
    videos = [frames_to_tensor(frames) for frames, _ in train_clips]  # (3, T, H, W)
    out = {}
    variants = (
        ("stage loss", False, recon_weights(s), 0.0),
        (
            f"stage loss + standout {STANDOUT}",
            False,
            dataclasses.replace(recon_weights(s), standout=STANDOUT),
            0.0,
        ),
        ("stage loss, adversarial", True, recon_weights(s), 0.0),
        (f"stage loss, colours permuted p={PERMUTE}", False, recon_weights(s), PERMUTE),
    )
    variants = tuple(v for i, v in enumerate(variants) if not only or i in only)
    for label, adversarial, weights, permute in variants:
        torch.manual_seed(0)
        model = (VideoVAE(scratch) if scratch else copy.deepcopy(vae)).to(device).train()
        disc = PatchDiscriminator().to(device) if adversarial else None
        trained = model.decoder if decoder_only else model
        model.encoder.requires_grad_(not decoder_only)
        groups = [{"params": list(trained.parameters()), "lr": lr}]
        if disc is not None:
            groups.append({"params": disc.parameters(), "lr": s.disc_lr})  # fresh: full rate
        opt = torch.optim.AdamW(groups, weight_decay=s.weight_decay, betas=(0.9, 0.99))
        base = [g["lr"] for g in groups]
        gen = torch.Generator().manual_seed(0)
        frames = 1 + tf * ((s.window_frames - 1) // tf)
        started = time.perf_counter()
        for step in range(steps):
            # The stage's schedule: warm-up then cosine. One full-rate AdamW step on
            # the trained VAE costs it ~19 dB PSNR.
            for g, lr in zip(opt.param_groups, base, strict=True):
                g["lr"] = lr_at(step, steps, lr, s.warmup_steps)
            batch = []
            for _ in range(batch_size):
                v = videos[int(torch.randint(len(videos), (1,), generator=gen))]
                start = tf * int(
                    torch.randint(0, (v.shape[1] - frames) // tf + 1, (1,), generator=gen)
                )
                batch.append(permute_colours(v[:, start : start + frames], permute, gen))
            x = torch.stack(batch).to(device)
            d = disc if (disc is not None and step >= gan_start) else None
            loss, _ = model.loss(x, weights, gen, d)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained.parameters(), s.grad_clip)
            opt.step()
        print(
            f"video VAE fine-tune ({label}): {steps} steps, {time.perf_counter() - started:.0f} s"
        )
        out[label] = model.eval()
    return out


def _scratch_audio_vae(pipe, spec: str, waveforms, steps: int, device):
    """A fresh audio VAE of ``spec`` ("L@W1-W2": latent channels @ level widths) trained
    for ``steps`` on random 1 s stereo segments of ``waveforms`` (4 a step) with the vae
    stage's audio settings (its KL weight, audio rate, schedule, AdamW and clip)."""
    import torch

    from model.audio_vae import AudioVAE
    from pipelines.train.config import VAEStageConfig
    from pipelines.train.loop import lr_at, step_generator

    latent, _, widths = spec.partition("@")
    cfg = dataclasses.replace(
        pipe.config.audio_vae,
        latent_channels=int(latent),
        channels=tuple(int(w) for w in widths.split("-")),
    )
    s = VAEStageConfig(steps=steps)
    torch.manual_seed(0)
    vae = AudioVAE(cfg, pipe.audio_vae.sample_rate, pipe.audio_vae.hop_length).to(device).train()
    opt = torch.optim.AdamW(
        vae.parameters(), lr=s.audio_lr, weight_decay=s.weight_decay, betas=(0.9, 0.99)
    )
    spl = vae.samples_per_latent
    seg = max(spl, pipe.audio_vae.sample_rate // spl * spl)
    usable = [w for w in waveforms if w.shape[-1] >= seg]
    started = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, s.audio_lr, s.warmup_steps)
        gen = step_generator(0, "bench/audio_vae", step, 0)
        picks = torch.randint(len(usable), (4,), generator=gen).tolist()
        batch = []
        for i in picks:
            w = usable[i]
            o = spl * int(torch.randint((w.shape[-1] - seg) // spl + 1, (1,), generator=gen))
            batch.append(w[:, o : o + seg])
        loss, _ = vae.loss(torch.stack(batch).to(device), s.kl_weight, gen)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), s.grad_clip)
        opt.step()
    vae.eval()
    vae.calibrate([w[None, :, : w.shape[-1] // spl * spl].to(device) for w in usable])
    params = sum(p.numel() for p in vae.parameters())
    print(
        f"audio VAE {spec} from scratch: {steps} steps, {params / 1e6:.2f}M parameters, "
        f"{vae.sample_rate / spl:.0f} latents/s, {time.perf_counter() - started:.0f} s"
    )
    return vae


def _audio_tables(args, pipe, clips, device) -> dict:
    import torch

    from model.audio_vae import griffin_lim, load_vocoder, mr_stft_distance

    cfg, avae = pipe.config, pipe.audio_vae
    spl = avae.samples_per_latent
    frame_s = 1.0 / cfg.fps
    # Scored lines first; the vocoder trains on the sentences after them.
    lines, train_lines = _lines(args, cfg.sample_rate, spl)
    if args.vocoder:
        vocoder, vocoder_note = load_vocoder(args.vocoder).to(device).eval(), args.vocoder
    elif pipe.use_neural_vocoder:
        vocoder, vocoder_note = pipe.vocoder, "checkpoint's"
    else:
        waveforms = [a for _, a in clips] + [a for _, a in train_lines]
        vocoder = _train_vocoder(
            pipe, waveforms, args.vocoder_steps, args.vocoder_gan_fraction,
            args.vocoder_gan_weight, device,
        )  # fmt: skip
        vocoder_note = (
            f"trained here, {args.vocoder_steps} steps, GAN last "
            f"{args.vocoder_gan_fraction:.0%} at {args.vocoder_gan_weight:g}"
        )

    def old_griffin_lim(mel, gen):
        b, c, m, t = mel.shape
        mag = avae.mel.to_magnitude(mel.reshape(b * c, m, t))
        wav = griffin_lim(
            avae.mel, mag, t * avae.hop_length, cfg.audio_vae.griffin_lim_iters, generator=gen
        )
        return wav.view(b, c, -1).clamp(-1, 1)

    def mel_of(wav):
        return avae.waveform_to_mel(wav[None].to(device))

    def vae_mel(wav):
        return avae.decode_mel(avae.encode(wav[None].to(device)))

    def run(decode, source, audio):
        """(decoded (C, N) on CPU, decode seconds); ``source`` makes the decoder's input
        (its time counted: the VAE's decode is part of the cost, its encode is not)."""
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            if source is vae_mel:
                z = avae.encode(audio[None].to(device))
                _warm_up(device, lambda: decode(avae.decode_mel(z), gen))
                gen.manual_seed(0)
                started = time.perf_counter()
                out = decode(avae.decode_mel(z), gen)[0].cpu()
            else:
                mel = source(audio)
                _warm_up(device, lambda: decode(mel, gen))
                gen.manual_seed(0)
                started = time.perf_counter()
                out = decode(mel, gen)[0].cpu()
            if device.type == "cuda":
                torch.cuda.synchronize()
        return out, time.perf_counter() - started

    gl_shared = lambda mel, gen: avae.mel_to_waveform(mel, None, gen)  # noqa: E731
    neural = lambda mel, gen: avae.mel_to_waveform(mel, vocoder)  # noqa: E731
    results = {"vocoder_note": vocoder_note, "clips": [], "speech": []}

    clip_decoders = {
        "griffin_lim (old: phase per channel)": old_griffin_lim,
        "griffin_lim (shared phase)": gl_shared,
        f"neural vocoder ({vocoder_note})": neural,
    }
    for name, decode in clip_decoders.items():
        acc = collections.defaultdict(list)
        for _, audio in clips:
            out, seconds = run(decode, mel_of, audio)
            acc["rtf"].append(seconds / (audio.shape[1] / cfg.sample_rate))
            with torch.no_grad():
                acc["mel"].append(float((mel_of(out) - mel_of(audio)).abs().mean()))
            acc["stft"].append(float(mr_stft_distance(out, audio)))
            acc["corr"].append(_corr(out[0], out[1]))
            acc["corr_orig"].append(_corr(audio[0], audio[1]))
            err = _onset_error(audio.numpy(), out.numpy(), cfg.sample_rate, frame_s)
            if err is not None:
                acc["onset"].append(err)
        results["clips"].append((name, acc))

    if not lines:
        return results
    speech_decoders = {
        "original waveform": (None, None),
        "own mel -> griffin_lim (shared phase)": (gl_shared, mel_of),
        "own mel -> neural vocoder": (neural, mel_of),
        "audio VAE -> griffin_lim (shared phase)": (gl_shared, vae_mel),
        "audio VAE -> neural vocoder": (neural, vae_mel),
    }
    if args.audio_scratch:
        from core.synth.speech import SENTENCES

        unscored = _speech_lines(range(args.lines, len(SENTENCES)), cfg.sample_rate, spl)
        waveforms = [a for _, a in clips] + [a for _, a in unscored]
        for spec in args.audio_scratch.split(","):
            fresh = _scratch_audio_vae(pipe, spec, waveforms, args.audio_steps, device)

            def through(audio, vae=fresh):
                n = audio.shape[-1]  # padded to the fresh VAE's latent grid, cut back after
                padded = torch.nn.functional.pad(audio, (0, (-n) % vae.samples_per_latent))
                return vae.decode_mel(vae.encode(padded[None].to(device)))[
                    ..., : n // vae.hop_length
                ]

            speech_decoders[f"fresh audio VAE {spec} -> neural vocoder"] = (neural, through)
    decoded = {}
    for name, (decode, source) in speech_decoders.items():
        acc = collections.defaultdict(list)
        outs = []
        for _, audio in lines:
            if decode is None:
                out, seconds = audio, 0.0
            else:
                out, seconds = run(decode, source, audio)
            outs.append(out)
            acc["rtf"].append(seconds / (audio.shape[1] / cfg.sample_rate))
            acc["stft"].append(float(mr_stft_distance(out, audio)))
            acc["corr"].append(_corr(out[0], out[1]))
            err = _onset_error(audio.numpy(), out.numpy(), cfg.sample_rate, frame_s)
            if err is not None:
                acc["onset"].append(err)
        decoded[name] = outs
        results["speech"].append((name, acc))
    from curation.speech import to_mono_16k

    refs = [text for text, _ in lines]
    heard = {
        n: [to_mono_16k(o.numpy(), cfg.sample_rate) for o in outs] for n, outs in decoded.items()
    }
    if args.speech_out:
        _save_speech(args.speech_out, refs, heard)
    try:
        for (_, acc), (wer, hyps) in zip(results["speech"], _transcribe(refs, heard), strict=True):
            acc["wer"], acc["hyps"] = [wer], hyps
    except Exception as exc:  # noqa: BLE001 - the rest of the bench still reports
        results["speech_error"] = f"{type(exc).__name__}: {exc}"
    results["refs"] = refs
    return results


def _transcribe(refs, heard) -> list[tuple[float, list[str]]]:
    """(corpus WER, transcripts) per decoder, through Duet's WhisperX stage. The env
    is not built here: a machine without it (the GPU image) saves the decoded audio
    (``--speech-out``) for ``--transcribe`` on one that has it."""
    from curation.speech import SpeechConfig, SpeechTranscriber, word_error_rate

    out = []
    with SpeechTranscriber(SpeechConfig(build_env_if_missing=False)) as stt:
        for audios in heard.values():
            hyps = [t.text for t in stt.transcribe_batch(audios)]
            out.append((word_error_rate(refs, hyps), hyps))
    return out


def _lines(args, sample_rate: int, spl: int):
    """(scored lines, vocoder training lines), from ``--lines-file`` when it exists (a
    machine without espeak-ng), else synthesised here (and saved there if named)."""
    import numpy as np
    import torch

    from core import storage

    path = args.lines_file
    if path and storage.exists(path):
        with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as data:
            if int(data["sample_rate"]) != sample_rate:
                raise SystemExit(
                    f"{path}: lines at {int(data['sample_rate'])} Hz, model {sample_rate}"
                )
            texts = [str(t) for t in data["texts"]]
            waves = [torch.from_numpy(data[f"wav_{i}"]) for i in range(len(texts))]
            scored = int(data["scored"])
        pairs = list(zip(texts, waves, strict=True))
        print(f"lines from {path}: {scored} scored, {len(pairs) - scored} for the vocoder")
        return pairs[:scored], pairs[scored:]
    if not args.lines:
        return [], []
    scored = _speech_lines(range(args.lines), sample_rate, spl)
    train = _speech_lines(range(args.lines, args.lines + 8), sample_rate, spl)
    if path:
        arrays = {f"wav_{i}": w.numpy() for i, (_, w) in enumerate(scored + train)}
        texts = np.array([t for t, _ in scored + train])
        buf = io.BytesIO()
        np.savez(buf, texts=texts, sample_rate=sample_rate, scored=len(scored), **arrays)
        storage.write_bytes(path, buf.getvalue())
        print(f"lines saved to {path}")
    return scored, train


def _save_speech(out_dir: str, refs, heard) -> None:
    """The decoded lines (16 kHz mono per decoder) for ``--transcribe`` elsewhere."""
    import numpy as np

    from core import storage

    arrays = {
        f"a_{k}_{i}": a for k, audios in enumerate(heard.values()) for i, a in enumerate(audios)
    }
    uri = storage.join(out_dir, "speech.npz")
    buf = io.BytesIO()
    np.savez(buf, refs=np.array(refs), names=np.array(list(heard)), **arrays)
    storage.write_bytes(uri, buf.getvalue())
    print(f"decoded speech saved to {uri}")


def transcribe_saved(out_dir: str) -> None:
    """WER per decoder from a saved ``speech.npz`` (``--transcribe DIR``)."""
    import numpy as np

    from core import storage

    uri = storage.join(out_dir, "speech.npz")
    with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as data:
        refs, names = [str(r) for r in data["refs"]], [str(n) for n in data["names"]]
        heard = {n: [data[f"a_{k}_{i}"] for i in range(len(refs))] for k, n in enumerate(names)}
    print(f"{len(refs)} lines from {out_dir}")
    for name, (wer, _) in zip(names, _transcribe(refs, heard), strict=True):
        print(f"{name:42s} WER {wer:.3f}")


PALETTE_SIDES = (0.1, 0.25)  # square sides of the palette sweep, as fractions of the frame


def _warm_up(device, call, *args) -> None:
    """On a GPU, run ``call(*args)`` once untimed and wait for it, so a timing that
    follows measures decoding, not CUDA's first-call start-up (a CPU needs none)."""
    import torch

    if device.type == "cuda":
        call(*args)
        torch.cuda.synchronize()


def _palette_clips(cfg, frames: int = 9) -> list:
    """Still clips of one square on a two-tone backdrop: every object colour of the
    synthetic world (night-dimmed on the night backdrops) on every backdrop, at two
    sizes. 8 colours x 6 backdrops x 2 sizes = 96 objects, 12 per colour: a retention
    figure per colour that a handful of held-out clips cannot give."""
    import numpy as np

    from core.synth import palette as pal

    h, w = cfg.height, cfg.width
    backdrops = [(b, 1.0) for b in pal.DAY_BACKGROUNDS.values()]
    backdrops += [(b, pal.NIGHT_OBJECT_GAIN) for b in pal.NIGHT_BACKGROUNDS.values()]
    out = []
    for colour, rgb in pal.OBJECT_COLORS.items():
        for (sky, floor), gain in backdrops:
            for i, side in enumerate(PALETTE_SIDES):
                img = np.empty((h, w, 3), np.uint8)
                img[: h // 2], img[h // 2 :] = sky, floor
                n = max(4, round(side * min(h, w)))
                # Left or right of centre, straddling the horizon at the larger size.
                y, x = h // 2 - n // 2 - (n // 4 if i == 0 else 0), (w // 4 if i == 0 else w // 2)
                img[y : y + n, x : x + n] = np.round(np.asarray(rgb) * gain).astype(np.uint8)
                out.append((colour, np.repeat(img[None], frames, axis=0)))
    return out


def _video_table(args, pipe, eval_clips, device) -> list:
    import numpy as np
    import torch

    from bench.vae_objects import _colour_found
    from core.probes.detect import detect_objects, min_object_area
    from model.pipeline import DuetPipeline
    from model.video_vae import frames_to_tensor, tensor_to_frames

    cfg, vae = pipe.config, pipe.video_vae
    whole_cfg = dataclasses.replace(
        vae.cfg, encode_chunk_latent_frames=0, decode_chunk_latent_frames=0,
        encode_tile_latent_px=0, decode_tile_latent_px=0,
    )  # fmt: skip
    tiled_cfg = dataclasses.replace(
        vae.cfg, encode_chunk_latent_frames=4, decode_chunk_latent_frames=4,
        encode_tile_latent_px=8, decode_tile_latent_px=8,
    )  # fmt: skip
    tiled = copy.deepcopy(vae)
    tiled.cfg = tiled_cfg
    vae.cfg = whole_cfg
    vaes = {"checkpoint's, whole clip": vae, "checkpoint's, tiled (4-latent chunks, 8-px)": tiled}
    if args.video_plain or args.video_adv:
        for label, uri in (("plain", args.video_plain), ("adversarial", args.video_adv)):
            if uri:
                other = DuetPipeline.from_checkpoint(uri).video_vae.to(device).eval()
                other.cfg = dataclasses.replace(other.cfg, **_whole_fields())
                vaes[f"{label} ({uri})"] = other
    elif args.video_steps > 0:
        seeds = range(3000, 3000 + args.video_train_clips)
        train = _synth_clips(
            cfg, seeds, args.seconds, pipe.audio_vae.samples_per_latent, _kinds(args)
        )
        only = tuple(int(i) for i in args.video_variants.split(",") if i.strip())
        scratch = None
        if args.video_scratch:
            widths = tuple(int(c) for c in args.video_scratch.split(","))
            scratch = dataclasses.replace(vae.cfg, channels=widths[:-1], latent_channels=widths[-1])
            scratch = dataclasses.replace(scratch, **_whole_fields())
        tuned = _finetune_video_vaes(
            vae, train, args.video_steps, args.video_gan_start, args.video_lr, device, only,
            scratch, args.video_batch, args.video_decoder_only,
        )  # fmt: skip
        how = f"from scratch ({args.video_scratch})" if scratch else "fine-tuned"
        how += ", decoder only" if args.video_decoder_only else ""
        for label, model in tuned.items():
            vaes[f"{label}, {how} {args.video_steps} steps"] = model

    area = min_object_area(min(cfg.height, cfg.width))
    orig_dets = [[detect_objects(f, area) for f in frames] for frames, _ in eval_clips]
    palette = _palette_clips(cfg)
    rows = []
    for label, model in vaes.items():
        acc = collections.defaultdict(list)
        found = collections.defaultdict(lambda: [0, 0])
        for (frames, _), orig in zip(eval_clips, orig_dets, strict=True):
            x = frames_to_tensor(frames)[None].to(device)
            with torch.no_grad():
                z = model.encode(x)
                _warm_up(device, model.decode, z)
                started = time.perf_counter()
                rec = model.decode(z)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - started
            acc["rtf"].append(seconds / (len(frames) / cfg.fps))
            a, b = (x[0].float().clamp(-1, 1) + 1) / 2, (rec[0].float().clamp(-1, 1) + 1) / 2
            mse = float(((a - b) ** 2).mean())
            acc["psnr"].append(10 * np.log10(1.0 / max(mse, 1e-12)))
            acc["ssim"].append(_ssim(a.transpose(0, 1).cpu(), b.transpose(0, 1).cpu()))
            recon = [detect_objects(f, area) for f in tensor_to_frames(rec[0])]
            for colour in sorted({d["color"] for dets in orig for d in dets}):
                if _colour_found(orig, colour):
                    found[colour][1] += 1
                    found[colour][0] += _colour_found(recon, colour)
            acc["recs"].append(rec.cpu())
        sweep = collections.defaultdict(lambda: [0, 0])
        # The tiled decode is the same VAE (its difference is printed): not swept again.
        for colour, frames in palette if model is not tiled else ():
            x = frames_to_tensor(frames)[None].to(device)
            with torch.no_grad():
                rec = model.decode(model.encode(x))
            recon = [detect_objects(f, area) for f in tensor_to_frames(rec[0])]
            sweep[colour][1] += 1
            sweep[colour][0] += _colour_found(recon, colour)
        acc["palette"] = dict(sweep)
        rows.append((label, acc, dict(sorted(found.items()))))
    return rows


def _whole_fields() -> dict:
    return dict(
        encode_chunk_latent_frames=0, decode_chunk_latent_frames=0,
        encode_tile_latent_px=0, decode_tile_latent_px=0,
    )  # fmt: skip


def _mean(v) -> float:
    return sum(v) / len(v)


def _print_audio(results, n_clips: int, args, sample_rate: int) -> None:
    print(
        f"\naudio: {n_clips} synthetic clips x {args.seconds:g} s, {sample_rate} Hz stereo, "
        "decoded from their own mels"
    )
    print(
        f"{'decoder':52s} {'mel L1':>7s} {'MR-STFT':>8s} {'onset err (fr, worst)':>22s} "
        f"{'L/R corr (orig)':>16s} {'s / out s':>9s}"
    )
    for name, m in results["clips"]:
        onset = f"{max(m['onset']):.2f}" if m.get("onset") else "n/a"
        corr = f"{_mean(m['corr']):.3f} ({_mean(m['corr_orig']):.3f})"
        print(
            f"{name:52s} {_mean(m['mel']):7.3f} {_mean(m['stft']):8.3f} {onset:>22s} "
            f"{corr:>16s} {_mean(m['rtf']):9.4f}"
        )
    if not results["speech"]:
        return
    print(
        f"\nspeech: {len(results['refs'])} talking-avatar lines (espeak-ng, held out from the "
        f"vocoder's training), panned L 1.0 / R 0.6 (orig L/R corr 1.000), transcribed by "
        f"Duet's WhisperX stage; vocoder: {results['vocoder_note']}"
    )
    if "speech_error" in results:
        print(f"  WER not measured: {results['speech_error']}")
    print(
        f"{'path':42s} {'WER':>6s} {'MR-STFT':>8s} {'onset err (fr, worst)':>22s} "
        f"{'L/R corr':>9s} {'s / out s':>9s}"
    )
    for name, m in results["speech"]:
        wer = f"{m['wer'][0]:.3f}" if m.get("wer") else "n/a"
        onset = f"{max(m['onset']):.2f}" if m.get("onset") else "n/a"
        print(
            f"{name:42s} {wer:>6s} {_mean(m['stft']):8.3f} {onset:>22s} "
            f"{_mean(m['corr']):9.3f} {_mean(m['rtf']):9.4f}"
        )
    if args.show_transcripts:
        for name, m in results["speech"]:
            for ref, hyp in zip(results["refs"], m.get("hyps", []), strict=False):
                print(f"  [{name}] {ref!r} -> {hyp!r}")


def _print_video(rows, n_clips: int, n_frames: int, cfg) -> None:
    import numpy as np

    print(f"\nvideo: {n_clips} held-out clips, {n_frames} frames at {cfg.width}x{cfg.height}")
    print(
        f"{'video VAE':44s} {'PSNR dB':>8s} {'SSIM':>6s} {'s / out s':>9s}  "
        "colour retention (found / in originals)"
    )
    for label, acc, found in rows:
        ret = ", ".join(f"{c} {k}/{n} ({100 * k / n:.0f}%)" for c, (k, n) in found.items())
        print(
            f"{label:44s} {np.mean(acc['psnr']):8.2f} {np.mean(acc['ssim']):6.3f} "
            f"{np.mean(acc['rtf']):9.4f}  {ret or 'no colours found'}"
        )
    print(
        f"\npalette sweep: one square of each colour on {len(PALETTE_SIDES) * 6} backdrop/size"
        " pairs (found / shown)"
    )
    for label, acc, _ in rows:
        sweep = acc["palette"]
        if not sweep:
            continue
        k, n = sum(v[0] for v in sweep.values()), sum(v[1] for v in sweep.values())
        per = ", ".join(f"{c} {a}/{b}" for c, (a, b) in sweep.items())
        print(f"{label:44s} {k:3d}/{n} ({100 * k / n:.0f}%)  {per}")
    diff = max(
        float((a - b).abs().max())
        for a, b in zip(rows[0][1]["recs"], rows[1][1]["recs"], strict=True)
    )
    print(f"largest |tiled - whole| pixel difference: {diff:.2e} (range [-1, 1])")


def _verdict(audio, rows) -> None:
    """The issue's done-when, line by line, from this run's numbers."""
    print("\nchecks (issue 22 item 4):")
    speech = dict(audio["speech"])
    for source in ("own mel", "audio VAE"):
        gl = speech.get(f"{source} -> griffin_lim (shared phase)", {}).get("wer")
        voc = speech.get(f"{source} -> neural vocoder", {}).get("wer")
        if gl and voc:
            ok = "yes" if voc[0] < gl[0] else "NO"
            print(f"  WER {source}: vocoder {voc[0]:.3f} < Griffin-Lim {gl[0]:.3f}: {ok}")
    for table in ("clips", "speech"):
        late = [(n, max(m["onset"])) for n, m in audio[table] if m.get("onset")]
        if late:
            bad = ", ".join(f"{n} {e:.2f}" for n, e in late if e > 1)
            worst = max(e for _, e in late)
            print(
                f"  onsets ({table}) within 1 frame: {'yes' if not bad else 'NO: ' + bad}"
                f" (worst {worst:.2f})"
            )
    for label, acc, found in rows:
        low = {c: k / n for c, (k, n) in found.items() if k / n < 0.95}
        verdict = "yes" if found and not low else f"NO ({', '.join(low) or 'no colours'})"
        print(f"  {label}: every colour retained >= 95%: {verdict}")
        low = [c for c, (k, n) in acc["palette"].items() if k / n < 0.95]
        verdict = "yes" if not low else f"NO ({', '.join(low)})"
        if acc["palette"]:
            print(f"  {label}: every colour of the palette sweep retained >= 95%: {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="", help="default: the shipped checkpoint")
    parser.add_argument("--clips", type=int, default=2, help="synthetic clips for the audio table")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument(
        "--lines", type=int, default=6, help="talking-avatar lines for WER (0: skip)"
    )
    parser.add_argument("--vocoder", default="", help="a standalone vocoder checkpoint")
    parser.add_argument("--vocoder-steps", type=int, default=4000)
    parser.add_argument("--vocoder-gan-fraction", type=float, default=0.05)
    parser.add_argument("--vocoder-gan-weight", type=float, default=0.1)
    parser.add_argument("--video-clips", type=int, default=4, help="held-out clips for video")
    parser.add_argument("--video-train-clips", type=int, default=4)
    parser.add_argument("--video-steps", type=int, default=40, help="0: checkpoint's VAE only")
    parser.add_argument("--video-gan-start", type=int, default=0)
    parser.add_argument("--video-lr", type=float, default=5e-5)
    parser.add_argument("--video-batch", type=int, default=2, help="windows per fine-tune step")
    parser.add_argument(
        "--video-variants", default="", help="e.g. 0,3: which fine-tunes (default: all)"
    )
    parser.add_argument(
        "--video-scratch",
        default="",
        help="e.g. 48,96,8: train fresh VAEs of these widths and latent channels instead",
    )
    parser.add_argument(
        "--video-decoder-only",
        action="store_true",
        help="fine-tune the decoder only (the encoder and its latents stay as they are)",
    )
    parser.add_argument("--video-plain", default="", help="checkpoint of a plain-trained VAE")
    parser.add_argument("--video-adv", default="", help="checkpoint of an adversarial VAE")
    parser.add_argument(
        "--audio-scratch", default="",
        help="e.g. 16@64-96,32@128-256: fresh audio VAEs (latent channels @ level widths)",
    )  # fmt: skip
    parser.add_argument("--audio-steps", type=int, default=3000)
    parser.add_argument("--lines-file", default="", help=".npz of the lines (made if absent)")
    parser.add_argument("--speech-out", default="", help="save the decoded lines here")
    parser.add_argument("--transcribe", default="", help="only: WER of a --speech-out dir")
    parser.add_argument("--show-transcripts", action="store_true")
    parser.add_argument(
        "--kinds", default="",
        help="scene kinds of the synthetic clips (comma-separated; default all; the "
        "talking avatar needs espeak-ng)",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.video_decoder_only and args.video_scratch:
        parser.error("--video-decoder-only fine-tunes a checkpoint's VAE: not with --video-scratch")
    if args.transcribe:
        transcribe_saved(args.transcribe)
        return

    import torch

    from model.checkpoint import default_checkpoint
    from model.pipeline import DuetPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    uri = args.checkpoint or default_checkpoint()
    pipe = DuetPipeline.from_checkpoint(uri) if uri else DuetPipeline.from_preset("tiny")
    pipe = pipe.to(device).eval()
    cfg = pipe.config
    print(f"checkpoint: {uri or 'fresh tiny (untrained: numbers mean nothing)'}; device {device}")
    spl = pipe.audio_vae.samples_per_latent
    n_eval = max(args.clips, args.video_clips)
    clips = _synth_clips(cfg, range(1000, 1000 + n_eval), args.seconds, spl, _kinds(args))

    audio = _audio_tables(args, pipe, clips[: args.clips], device)
    rows = _video_table(args, pipe, clips[: args.video_clips], device)
    _print_audio(audio, args.clips, args, cfg.sample_rate)
    _print_video(rows, args.video_clips, len(clips[0][0]), cfg)
    _verdict(audio, rows)


if __name__ == "__main__":
    main()
