"""Scene kinds of the synthetic world: physics, rendering and sound of one shot.

Every scene is drawn from a seeded ``numpy.random.Generator``; the same seed gives
the same shot bit for bit. A scene first plans the whole shot (objects, their
positions at every frame time, events with exact times), then one renderer turns
the plan into frames and a stereo track. Event sounds start at sample
``round(event_time * sample_rate)``; frame ``k`` shows the world at ``k / fps``.

Events are kept at least ``min_event_gap_s`` apart and out of the first
``guard_start_s`` and last ``guard_end_s`` of the shot (plans are redrawn until
they are), so every event can be measured without a transition or a neighbouring
event in the way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from core.synth import audio as sfx
from core.synth import palette, raster
from core.synth.captions import count_phrase, describe_objects, plural_verb
from core.synth.speech import SENTENCES, VOICES, SpeechTrack, envelope_at, synthesize_sentence

SCENE_KINDS: tuple[str, ...] = (
    "bouncing_balls",
    "collision",
    "beat_pulse",
    "talking_avatar",
    "day_night",
    "camera_pan",
)
VARIANTS = ("day", "night")
# Fraction of the frame height above the floor line.
FLOOR_FRACTION = 0.85
# Gravity in frame heights per second squared: a drop of 0.7 H takes ~0.5 s.
GRAVITY_H_PER_S2 = 6.0
# A ball whose next flight would be shorter than this comes to rest instead, so
# impacts never crowd together (and each stays measurable from the frames).
MIN_FLIGHT_S = 0.3
# Beat pulse: scale jumps by this much on the beat and decays with this time.
PULSE_AMPLITUDE = 0.35
PULSE_DECAY_S = 0.1
MAX_PLAN_ATTEMPTS = 400


class SceneError(ValueError):
    """A shot could not be planned with the requested parameters."""


@dataclass
class ShotPlan:
    """Everything needed to render a shot, with exact ground truth."""

    kind: str
    variant: str
    background: str
    caption: str
    objects: list[dict]  # {"id", "color", "shape", "radius_px"}
    xy: np.ndarray  # (O, T, 2) float64 centroid of each object at each frame time
    scale: np.ndarray  # (O, T) float64 size multiplier (beat pulses)
    events: list[dict]  # {"type", "time_s", "object_ids", "x_px", "loudness"}
    floor_y: int  # first floor row; == height when there is no floor
    walls_px: int = 0  # width of side walls (collision box), 0 for none
    pan_px_per_s: float = 0.0
    texture: np.ndarray | None = None  # (L,) column offsets for a panning backdrop
    speech: SpeechTrack | None = None
    speech_meta: dict = field(default_factory=dict)
    face: dict | None = None  # talking avatar geometry
    bpm: float | None = None


@dataclass
class ShotSpec:
    width: int
    height: int
    fps: float
    sample_rate: int
    duration_s: float
    variant: str
    guard_start_s: float
    guard_end_s: float
    min_event_gap_s: float

    @property
    def num_frames(self) -> int:
        return int(round(self.duration_s * self.fps))

    @property
    def frame_times(self) -> np.ndarray:
        return np.arange(self.num_frames, dtype=np.float64) / self.fps

    @property
    def gravity(self) -> float:
        return GRAVITY_H_PER_S2 * self.height

    @property
    def floor_y(self) -> int:
        return int(round(FLOOR_FRACTION * self.height))


def _events_ok(times: list[float], spec: ShotSpec) -> bool:
    if not times:
        return True
    ts = np.sort(np.asarray(times))
    if ts[0] < spec.guard_start_s or ts[-1] > spec.duration_s - spec.guard_end_s:
        return False
    return bool(np.all(np.diff(ts) >= spec.min_event_gap_s)) if ts.size > 1 else True


def _pick_colors(rng: np.random.Generator, count: int, distinct: bool) -> list[str]:
    if distinct:
        idx = rng.choice(len(palette.COLOR_NAMES), size=count, replace=False)
        return [palette.COLOR_NAMES[i] for i in idx]
    # Few distinct colours, so counts in captions ("three blue circles") occur.
    chosen = rng.choice(len(palette.COLOR_NAMES), size=min(2, count), replace=False)
    return [palette.COLOR_NAMES[chosen[rng.integers(0, len(chosen))]] for _ in range(count)]


def _size_px(rng: np.random.Generator, spec: ShotSpec, lo: float, hi: float) -> float:
    return float(round(rng.uniform(lo, hi) * spec.height, 2))


# ------------------------------------------------------------------ bouncing


def simulate_bounce(
    y0: float,
    vy0: float,
    gravity: float,
    contact_y: float,
    restitution: float,
    duration_s: float,
    times: np.ndarray,
    release_s: float = 0.0,
) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Ballistic fall with floor bounces (y grows downwards).

    The ball is held still at ``y0`` until ``release_s``, then moves from there
    with vertical speed ``vy0``. Returns y at ``times`` and the impacts as
    ``(time_s, speed_px_per_s)``. After an impact the ball leaves at
    ``restitution`` times its incoming speed, or rests on the floor if the next
    flight would last less than ``MIN_FLIGHT_S``.
    """
    if y0 > contact_y:
        raise SceneError("ball starts below the floor")
    starts = [min(0.0, release_s), release_s]
    states = [(y0, 0.0, True), (y0, vy0, False)]  # (y, vy, resting)
    impacts: list[tuple[float, float]] = []
    t, y, v = release_s, y0, vy0
    while True:
        # Solve y + v*tau + g/2*tau^2 = contact_y for the positive root.
        a, b, c = 0.5 * gravity, v, y - contact_y
        tau = (-b + np.sqrt(max(b * b - 4.0 * a * c, 0.0))) / (2.0 * a)
        t_hit = t + float(tau)
        if t_hit > duration_s:
            break
        v_in = v + gravity * float(tau)
        impacts.append((t_hit, v_in))
        v_out = -restitution * v_in
        if 2.0 * abs(v_out) / gravity < MIN_FLIGHT_S:
            starts.append(t_hit)
            states.append((contact_y, 0.0, True))  # at rest on the floor
            break
        starts.append(t_hit)
        states.append((contact_y, v_out, False))
        t, y, v = t_hit, contact_y, v_out
    seg = np.maximum(np.searchsorted(np.asarray(starts), times, side="right") - 1, 0)
    ys = np.empty_like(times)
    for i, (ys0, vs0, resting) in enumerate(states):
        sel = seg == i
        tau = times[sel] - starts[i]
        ys[sel] = ys0 if resting else ys0 + vs0 * tau + 0.5 * gravity * tau * tau
    return ys, impacts


def _plan_bouncers(
    rng: np.random.Generator,
    spec: ShotSpec,
    count: int,
    shapes: list[str],
    colors: list[str],
    x_ranges: list[tuple[float, float]],
    allow_vx: bool,
) -> tuple[list[dict], np.ndarray, list[dict]] | None:
    """One attempt at a set of bouncing objects in separate lanes; None if rejected."""
    g = spec.gravity
    times = spec.frame_times
    floor = spec.floor_y
    objects, xy, events = [], np.zeros((count, times.size, 2)), []
    impact_times: list[float] = []
    for i in range(count):
        size = _size_px(rng, spec, 0.045, 0.075)
        half_w, bottom = raster.shape_extent(shapes[i], size)
        lo, hi = x_ranges[i]
        lo, hi = lo + half_w + 2.0, hi - half_w - 2.0
        if hi <= lo:
            return None  # lanes too narrow: the retry drops an object
        x0 = rng.uniform(lo, hi)
        if allow_vx:
            room = min(x0 - lo, hi - x0) / spec.duration_s
            vx = rng.uniform(-room, room)
        else:
            vx = 0.0
        contact_y = floor - 0.5 - bottom
        # First fall: from a drop height, landing just after the shot's start guard.
        # A ball that would have to start before the shot is caught mid-fall at
        # t = 0; one that lands later is held at the top until its release.
        top = 0.08 * spec.height + 1.4 * size
        drop = rng.uniform(0.3, 1.0) * (contact_y - top)
        v_in = np.sqrt(2.0 * g * drop)
        fall_s = v_in / g
        first_hit = spec.guard_start_s + rng.uniform(0.02, 0.6)
        if first_hit >= fall_s:
            y0, vy0, release = contact_y - drop, 0.0, first_hit - fall_s
        else:
            y0 = contact_y - v_in * first_hit + 0.5 * g * first_hit**2
            vy0, release = v_in - g * first_hit, 0.0
        restitution = rng.uniform(0.78, 0.93)
        ys, impacts = simulate_bounce(
            y0, vy0, g, contact_y, restitution, spec.duration_s, times, release
        )
        xy[i, :, 0] = x0 + vx * times
        xy[i, :, 1] = ys
        objects.append({"id": i, "color": colors[i], "shape": shapes[i], "radius_px": size})
        for t_hit, speed in impacts:
            impact_times.append(t_hit)
            events.append(
                {
                    "type": "impact",
                    "time_s": t_hit,
                    "object_ids": [i],
                    "x_px": x0 + vx * t_hit,
                    "loudness": float(
                        np.clip(0.25 + 0.6 * speed / np.sqrt(g * spec.height), 0.25, 0.9)
                    ),
                }
            )
    if not _events_ok(impact_times, spec):
        return None
    return objects, xy, sorted(events, key=lambda e: e["time_s"])


def _lanes(lo: float, hi: float, count: int) -> list[tuple[float, float]]:
    edges = np.linspace(lo, hi, count + 1)
    return [(float(edges[i]), float(edges[i + 1])) for i in range(count)]


def _retry(
    rng: np.random.Generator, max_count: int, attempt: Callable[[int], object | None]
) -> tuple[int, object]:
    """Call ``attempt(count)`` until it returns a plan, dropping an object every 100 tries."""
    count = max_count
    for tries in range(MAX_PLAN_ATTEMPTS):
        if tries and tries % 100 == 0 and count > 1:
            count -= 1
        plan = attempt(count)
        if plan is not None:
            return count, plan
    raise SceneError(
        "could not fit the objects in the frame with events clear of the shot edges; "
        "use a larger frame, longer shots or shorter guards"
    )


def plan_bouncing(rng: np.random.Generator, spec: ShotSpec, kind: str) -> ShotPlan:
    """bouncing_balls (circles), day_night (mixed shapes) and camera_pan (a pan past bouncers)."""
    pan = 0.0
    texture = None
    if kind == "bouncing_balls":
        max_count = int(rng.integers(1, 5))
        shapes_all = ["circle"] * max_count
        colors_all = _pick_colors(rng, max_count, distinct=False)
    elif kind == "day_night":
        max_count = int(rng.integers(2, 4))
        shapes_all = [palette.SHAPES[j] for j in rng.integers(0, 3, size=max_count)]
        colors_all = _pick_colors(rng, max_count, distinct=False)
    elif kind == "camera_pan":
        max_count = int(rng.integers(1, 4))
        shapes_all = [palette.SHAPES[j] for j in rng.integers(0, 3, size=max_count)]
        colors_all = _pick_colors(rng, max_count, distinct=False)
        # At most 60% of the frame width over the shot, so objects stay in view.
        speed = min(rng.uniform(0.08, 0.16) * spec.width, 0.6 * spec.width / spec.duration_s)
        pan = float(rng.choice([-1.0, 1.0]) * speed)
        span = abs(pan) * spec.duration_s
        texture = raster.stripe_texture(
            rng, int(np.ceil(spec.width + span)) + 4, palette.TEXTURE_AMPLITUDE, 6, 28
        )
    else:
        raise SceneError(f"not a bouncing scene: {kind}")

    # Screen x = world x - pan * t; keep every object on screen for the whole shot.
    world_lo = max(0.0, pan * spec.duration_s) + 4.0
    world_hi = spec.width + min(0.0, pan * spec.duration_s) - 4.0
    if world_hi - world_lo < 0.3 * spec.width:
        raise SceneError("pan too fast for the shot duration")
    # Each object needs a lane at least as wide as the largest object plus margins.
    widest = 2.0 * raster.shape_extent("triangle", 0.075 * spec.height)[0] + 6.0
    max_count = max(1, min(max_count, int((world_hi - world_lo) // widest)))

    def attempt(count: int):
        return _plan_bouncers(
            rng,
            spec,
            count,
            shapes_all[:count],
            colors_all[:count],
            _lanes(world_lo, world_hi, count),
            allow_vx=kind != "camera_pan",
        )

    count, planned = _retry(rng, max_count, attempt)
    objects, xy, events = planned  # type: ignore[misc]
    times = spec.frame_times
    if pan:
        xy[:, :, 0] -= pan * times[None, :]
        for ev in events:
            ev["x_px"] -= pan * ev["time_s"]
    described = describe_objects(objects)
    if kind == "bouncing_balls":
        caption = f"{described} {plural_verb(objects, 'bounces', 'bounce')} on a gray floor"
    elif kind == "day_night":
        when = "in daylight" if spec.variant == "day" else "at night"
        caption = f"{described} {plural_verb(objects, 'bounces', 'bounce')} on a floor {when}"
    else:
        direction = "right" if pan > 0 else "left"
        caption = f"the camera pans {direction} past {described} bouncing on a gray floor"
    return ShotPlan(
        kind=kind,
        variant=spec.variant,
        background="",
        caption=caption,
        objects=objects,
        xy=xy,
        scale=np.ones(xy.shape[:2]),
        events=events,
        floor_y=spec.floor_y,
        pan_px_per_s=pan,
        texture=texture,
    )


# ------------------------------------------------------------------ collision


def simulate_box(
    x: np.ndarray,
    v: np.ndarray,
    half: np.ndarray,
    mass: np.ndarray,
    left: float,
    right: float,
    restitution: float,
    duration_s: float,
    times: np.ndarray,
) -> tuple[np.ndarray, list[tuple[str, float, list[int]]]]:
    """Two bodies sliding between two walls, event-driven and exact.

    Body-body contacts exchange momentum with ``restitution``; wall contacts are
    elastic. Returns x at ``times`` (2, T) and events ``(type, time, ids)``.
    """
    x, v = x.astype(np.float64).copy(), v.astype(np.float64).copy()
    t = 0.0
    knots = [(0.0, x.copy(), v.copy())]
    events: list[tuple[str, float, list[int]]] = []
    while True:
        candidates = []
        if v[0] < 0:
            candidates.append(((left + half[0] - x[0]) / v[0], "wall", [0]))
        if v[1] > 0:
            candidates.append(((right - half[1] - x[1]) / v[1], "wall", [1]))
        closing = v[0] - v[1]
        if closing > 0:
            candidates.append(((x[1] - half[1] - (x[0] + half[0])) / closing, "body", [0, 1]))
        if not candidates:
            break
        dt, what, ids = min(candidates, key=lambda c: c[0])
        dt = max(dt, 0.0)
        if t + dt > duration_s:
            break
        t += dt
        x = x + v * dt
        if what == "wall":
            v[ids[0]] = -v[ids[0]]
            events.append(("impact", t, ids))
        else:
            m1, m2 = mass
            u1, u2 = v
            total = m1 + m2
            # 1-D collision with restitution e: momentum is conserved.
            v = np.array(
                [
                    (m1 * u1 + m2 * u2 + m2 * restitution * (u2 - u1)) / total,
                    (m1 * u1 + m2 * u2 + m1 * restitution * (u1 - u2)) / total,
                ]
            )
            events.append(("collision", t, ids))
        knots.append((t, x.copy(), v.copy()))
    starts = np.asarray([k[0] for k in knots])
    seg = np.searchsorted(starts, times, side="right") - 1
    out = np.empty((2, times.size))
    for i, (t0, x0, v0) in enumerate(knots):
        sel = seg == i
        out[:, sel] = x0[:, None] + v0[:, None] * (times[sel] - t0)[None, :]
    return out, events


def plan_collision(rng: np.random.Generator, spec: ShotSpec) -> ShotPlan:
    shapes = [palette.SHAPES[j] for j in rng.choice([0, 1], size=2)]
    colors = _pick_colors(rng, 2, distinct=True)
    walls = max(int(round(0.015 * spec.width)), 2)
    left, right = walls - 0.5, spec.width - walls - 0.5
    times = spec.frame_times

    def attempt(_count: int):
        sizes = np.array([_size_px(rng, spec, 0.06, 0.085) for _ in range(2)])
        mass = sizes**2
        x0 = np.array([rng.uniform(0.12, 0.35) * spec.width, rng.uniform(0.65, 0.88) * spec.width])
        speed = np.array([rng.uniform(0.25, 0.6), -rng.uniform(0.25, 0.6)]) * spec.width
        restitution = rng.uniform(0.85, 1.0)
        xs, evs = simulate_box(
            x0, speed, sizes, mass, left, right, restitution, spec.duration_s, times
        )
        if not any(e[0] == "collision" for e in evs):
            return None
        if not _events_ok([e[1] for e in evs], spec):
            return None
        return sizes, xs, evs

    _, planned = _retry(rng, 1, attempt)
    sizes, xs, evs = planned  # type: ignore[misc]
    y = np.array(
        [
            spec.floor_y - 0.5 - raster.shape_extent(s, r)[1]
            for s, r in zip(shapes, sizes, strict=True)
        ]
    )
    xy = np.stack([xs, np.broadcast_to(y[:, None], xs.shape)], axis=-1)
    objects = [
        {"id": i, "color": colors[i], "shape": shapes[i], "radius_px": float(sizes[i])}
        for i in range(2)
    ]
    events = []
    for what, t_ev, ids in evs:
        k = min(int(round(t_ev * spec.fps)), times.size - 1)
        x_at = float(np.mean([xs[i, k] for i in ids]))
        events.append(
            {"type": what, "time_s": t_ev, "object_ids": ids, "x_px": x_at, "loudness": 0.8}
        )
    a = count_phrase(1, colors[0], shapes[0])
    b = count_phrase(1, colors[1], shapes[1])
    return ShotPlan(
        kind="collision",
        variant=spec.variant,
        background="",
        caption=f"{a} and {b} slide and collide on a gray floor",
        objects=objects,
        xy=xy,
        scale=np.ones(xs.shape),
        events=events,
        floor_y=spec.floor_y,
        walls_px=walls,
    )


# ------------------------------------------------------------------ beat pulse


def plan_beat_pulse(rng: np.random.Generator, spec: ShotSpec) -> ShotPlan:
    count = int(rng.integers(1, 5))
    shapes = [palette.SHAPES[j] for j in rng.integers(0, 3, size=count)]
    colors = _pick_colors(rng, count, distinct=False)
    bpm = float(rng.integers(90, 141))
    period = 60.0 / bpm
    first = spec.guard_start_s + rng.uniform(0.0, period)
    beats = np.arange(first, spec.duration_s - spec.guard_end_s, period)
    if beats.size == 0:
        raise SceneError("shot too short for a beat")
    times = spec.frame_times
    # Scale at each frame: jump on the latest beat at or before it, decay after.
    idx = np.searchsorted(beats, times, side="right") - 1
    since = np.where(idx >= 0, times - beats[np.maximum(idx, 0)], np.inf)
    scale_row = 1.0 + PULSE_AMPLITUDE * np.exp(-since / PULSE_DECAY_S)
    centres = np.linspace(0.0, spec.width, count + 2)[1:-1]
    objects = []
    xy = np.zeros((count, times.size, 2))
    for i in range(count):
        size = min(_size_px(rng, spec, 0.06, 0.09), 0.5 * spec.width / (count + 1) / 1.6)
        objects.append({"id": i, "color": colors[i], "shape": shapes[i], "radius_px": size})
        xy[i, :, 0] = centres[i]
        xy[i, :, 1] = 0.45 * spec.height
    events = [
        {
            "type": "beat",
            "time_s": float(t),
            "object_ids": list(range(count)),
            "x_px": spec.width / 2.0,
            "loudness": 0.8,
        }
        for t in beats
    ]
    described = describe_objects(objects)
    return ShotPlan(
        kind="beat_pulse",
        variant=spec.variant,
        background="",
        caption=f"{described} {plural_verb(objects, 'pulses', 'pulse')} to a beat at {int(bpm)} bpm",
        objects=objects,
        xy=xy,
        scale=np.broadcast_to(scale_row[None, :], (count, times.size)).copy(),
        events=events,
        floor_y=spec.floor_y,
        bpm=bpm,
    )


# ------------------------------------------------------------------ talking avatar


def plan_talking_avatar(rng: np.random.Generator, spec: ShotSpec) -> ShotPlan:
    color = palette.COLOR_NAMES[int(rng.integers(0, len(palette.COLOR_NAMES)))]
    voice = VOICES[int(rng.integers(0, len(VOICES)))]
    speed = int(rng.integers(140, 181))
    pitch = int(rng.integers(35, 66))
    first = int(rng.integers(0, len(SENTENCES)))
    lead_in = spec.guard_start_s + rng.uniform(0.05, 0.3)
    gap_seed = int(rng.integers(0, 2**31))
    limit = spec.duration_s - spec.guard_end_s
    # The drawn sentence, else the next ones in order of length until one fits.
    candidates = [SENTENCES[first]] + sorted(
        (x for x in SENTENCES if x != SENTENCES[first]), key=lambda x: (len(x.split()), x)
    )
    for sentence in candidates:
        track = synthesize_sentence(
            sentence.split(),
            spec.sample_rate,
            np.random.default_rng(gap_seed),
            lead_in,
            voice,
            speed,
            pitch,
        )
        if track.words[-1]["end_s"] <= limit:
            break
    else:
        raise SceneError("shot too short for a spoken sentence")
    radius = 0.3 * spec.height
    face = {
        "x": spec.width / 2.0 + rng.uniform(-0.15, 0.15) * spec.width,
        "y": 0.48 * spec.height,
        "radius": radius,
    }
    times = spec.frame_times
    objects = [{"id": 0, "color": color, "shape": "circle", "radius_px": round(radius, 2)}]
    xy = np.zeros((1, times.size, 2))
    xy[0, :, 0], xy[0, :, 1] = face["x"], face["y"]
    return ShotPlan(
        kind="talking_avatar",
        variant=spec.variant,
        background="",
        caption=f'{count_phrase(1, color, "face")} says "{track.text}"',
        objects=objects,
        xy=xy,
        scale=np.ones((1, times.size)),
        events=[],
        floor_y=spec.height,
        speech=track,
        speech_meta={"voice": voice, "speed_wpm": speed, "pitch": pitch},
        face=face,
    )


# ------------------------------------------------------------------ rendering


def render_frames(plan: ShotPlan, spec: ShotSpec) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of a plan."""
    sky, floor = palette.backgrounds(spec.variant)[plan.background]
    base = raster.backdrop(spec.height, spec.width, sky, floor, plan.floor_y)
    if plan.walls_px:
        base[:, : plan.walls_px] = np.asarray(floor, np.float32)
        base[:, -plan.walls_px :] = np.asarray(floor, np.float32)
    colors = [palette.object_rgb(o["color"], spec.variant) for o in plan.objects]
    feature = np.asarray(palette.FEATURE_COLOR, np.float32)
    mouth = None
    if plan.speech is not None:
        mouth = envelope_at(plan.speech, spec.frame_times, 1.0 / spec.fps)
    frames = np.empty((spec.num_frames, spec.height, spec.width, 3), dtype=np.uint8)
    columns = np.arange(spec.width, dtype=np.float64)
    for k, t in enumerate(spec.frame_times):
        if plan.texture is not None:
            # Texture fixed to the world: screen column c shows world column c + pan*t.
            offset = plan.pan_px_per_s * t - min(0.0, plan.pan_px_per_s * spec.duration_s)
            shade = np.interp(columns + offset, np.arange(plan.texture.size), plan.texture)
            image = base + shade.astype(np.float32)[None, :, None]
        else:
            image = base.copy()
        for i, obj in enumerate(plan.objects):
            x, y = plan.xy[i, k]
            raster.draw_shape(
                image, obj["shape"], x, y, obj["radius_px"] * plan.scale[i, k], colors[i]
            )
        if plan.face is not None and mouth is not None:
            fx, fy, r = plan.face["x"], plan.face["y"], plan.face["radius"]
            for side in (-1.0, 1.0):
                raster.draw_ellipse(
                    image, fx + side * 0.35 * r, fy - 0.25 * r, 0.1 * r, 0.12 * r, feature
                )
            raster.draw_ellipse(
                image, fx, fy + 0.42 * r, 0.35 * r, 0.04 * r + 0.3 * r * float(mouth[k]), feature
            )
        frames[k] = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return frames


def render_audio(plan: ShotPlan, spec: ShotSpec, rng: np.random.Generator) -> np.ndarray:
    """(2, N) float32 stereo track of a plan; N = num_frames / fps * sample_rate."""
    sr = spec.sample_rate
    n = int(round(spec.num_frames / spec.fps * sr))
    track = sfx.room_tone(n, rng)
    thump_freq = rng.uniform(140.0, 260.0)
    click_freq = rng.uniform(2200.0, 3800.0)
    chord = np.array([261.63, 329.63, 392.0, 523.25]) * rng.choice([0.75, 1.0, 1.5])
    for j, ev in enumerate(plan.events):
        start = int(round(ev["time_s"] * sr))
        left, right = sfx.pan_gains(ev["x_px"], spec.width)
        if ev["type"] == "impact":
            sound = sfx.thump(sr, thump_freq, rng.uniform(0.025, 0.04), rng)
        elif ev["type"] == "collision":
            sound = sfx.click(sr, click_freq, rng)
        else:
            sound = sfx.kick(sr, rng)
            pluck = sfx.tone(sr, float(chord[j % chord.size]), 0.25)
            sound = np.concatenate([sound, np.zeros(max(pluck.size - sound.size, 0), np.float32)])
            sound[: pluck.size] += 0.35 * pluck
        sfx.place(track, start, ev["loudness"] * sound, left, right)
    if plan.speech is not None:
        speech = plan.speech.audio[:n]
        left, right = sfx.pan_gains(plan.face["x"] if plan.face else spec.width / 2, spec.width)
        sfx.place(track, 0, 0.9 * speech, left, right)
    peak = float(np.max(np.abs(track))) if n else 0.0
    if peak > 0.95:
        track *= 0.95 / peak
    return track.astype(np.float32)


def ground_truth(plan: ShotPlan, spec: ShotSpec) -> dict:
    """The shot's ground truth with times relative to the shot start."""
    times = spec.frame_times
    objects = []
    for i, obj in enumerate(plan.objects):
        trajectory = [
            [round(float(t), 6), round(float(x), 3), round(float(y), 3)]
            for t, (x, y) in zip(times, plan.xy[i], strict=True)
        ]
        objects.append({**obj, "trajectory": trajectory})
    speech = None
    if plan.speech is not None:
        speech = {"text": plan.speech.text, "words": plan.speech.words, **plan.speech_meta}
    truth = {
        "kind": plan.kind,
        "caption": plan.caption,
        "variant": plan.variant,
        "background": plan.background,
        "duration_s": round(spec.num_frames / spec.fps, 6),
        "camera_pan_px_per_s": round(plan.pan_px_per_s, 4),
        "objects": objects,
        "events": [
            {
                "type": e["type"],
                "time_s": round(float(e["time_s"]), 6),
                "object_ids": e["object_ids"],
            }
            for e in plan.events
        ],
        "speech": speech,
    }
    if plan.bpm is not None:
        truth["bpm"] = plan.bpm
    return truth


def plan_shot(kind: str, rng: np.random.Generator, spec: ShotSpec) -> ShotPlan:
    if kind in ("bouncing_balls", "day_night", "camera_pan"):
        return plan_bouncing(rng, spec, kind)
    if kind == "collision":
        return plan_collision(rng, spec)
    if kind == "beat_pulse":
        return plan_beat_pulse(rng, spec)
    if kind == "talking_avatar":
        return plan_talking_avatar(rng, spec)
    raise SceneError(f"unknown scene kind {kind!r}; known: {', '.join(SCENE_KINDS)}")
