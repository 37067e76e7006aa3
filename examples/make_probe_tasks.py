"""Synthesise probe tasks for evaluating frozen audio features (MARBLE-style probing).

    python examples/make_probe_tasks.py OUT_DIR [--tasks pitch,timbre,chord,tempo,instruments]
                                        [--n 600] [--seconds 4.0] [--sr 24000] [--seed 0]
    python examples/make_probe_tasks.py OUT_DIR --tasks chords,beats,notes,keys --n 150   # timed tasks

All audio is synthesised here (no licence attached). Each task isolates one musical property and
randomises the rest (instrument family, register, level, timing, noise), so a probe must read it from
the features. Clip tasks: pitch (24-way), timbre (6 families), chord (6 qualities), tempo (BPM,
regression), instruments (multi-label). Timed tasks, whose label is an annotation file for
`probe.py --task chords|beats|notes|segments`: chords, beats, notes, keys. docs/probing.md describes
each task and the six instrument families.

Writes OUT_DIR/T/T_00000.flac ... (mono PCM_16, peak -20..-6 dBFS, white or pink noise 35-50 dB below
the peak, so nothing is digital silence) and OUT_DIR/T.csv: path (relative to OUT_DIR),label,split.
Splits are 60/20/20 train/valid/test within each label (label set for instruments, tempo decile for
tempo; timed tasks at random). Clip i of task T uses only default_rng([seed, index of T, 0, i]), so
the output does not depend on --tasks.
"""
import argparse
import csv
from pathlib import Path

import numpy as np
import soundfile as sf

CLIP_TASKS = ("pitch", "timbre", "chord", "tempo", "instruments")
TIMED_TASKS = ("chords", "beats", "notes", "keys")
TASKS = CLIP_TASKS + TIMED_TASKS  # position = the task's seed index
TIMED_SECONDS = 6.0  # timed clips are at least this long, so that several changes, bars and notes fit
FAMILIES = ("bell", "bowed", "flute", "organ", "pluck", "reed")  # sorted: instruments label order
PITCHED = tuple(f for f in FAMILIES if f != "bell")
NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
CHORDS = dict(maj=(0, 4, 7), min=(0, 3, 7), dim=(0, 3, 6), aug=(0, 4, 8), sus4=(0, 5, 7), dom7=(0, 4, 7, 10))
TEMPO_RANGE = (70.0, 170.0)
TEMPO_SECONDS = np.ceil(2 * 6 * 60 / TEMPO_RANGE[0]) / 2  # 6 beats at the slowest tempo, rounded up to 0.5 s
TABLE = 2048  # wavetable length: cost per sample no longer grows with the number of harmonics


def midi_to_hz(m):
    return 440.0 * 2.0 ** ((m - 69) / 12)


def band_noise(n, sr, lo, hi, rng):
    """White noise band-passed in the frequency domain (numpy has no IIR filters), unit peak."""
    f = np.fft.rfftfreq(n, 1 / sr) + 1e-3
    gain = 1 / (1 + (lo / f) ** 4) / (1 + (f / hi) ** 4)
    x = np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * gain, n)
    return x / (np.abs(x).max() + 1e-12)


def make_patch(family, rng):
    """One instrument of a family: what stays fixed across its notes within a clip."""
    u = rng.uniform
    p = dict(family=family, attack=u(0.005, 0.015), decay=1.0, sustain=1.0, release=u(0.03, 0.08),
             vib_depth=0.0, vib_rate=u(4.5, 6.5), tilt=1.0, n_harm=int(rng.integers(15, 40)),
             cutoff=u(3000, 8000), bright=0.0, phases=u(0, 2 * np.pi, 64))
    if family == "pluck":  # dull body, bright transient that dies away fast
        p.update(attack=u(0.002, 0.006), decay=u(0.15, 0.6), sustain=0.0, release=u(0.05, 0.15),
                 tilt=u(0.7, 1.2), pluck_pos=u(0.08, 0.3), cutoff=u(1200, 3500), bright=u(0.03, 0.2))
    elif family == "bowed":
        p.update(attack=u(0.08, 0.25), decay=0.3, sustain=u(0.8, 1.0), release=u(0.08, 0.2),
                 tilt=u(0.9, 1.3), vib_depth=u(8, 30), cutoff=u(2500, 7000))
    elif family == "reed":  # clarinet-like (weak even harmonics) or brass-like, both with a formant
        p.update(attack=u(0.02, 0.08), release=u(0.05, 0.15), tilt=u(0.6, 1.1),
                 even=u(0.05, 0.3) if rng.random() < 0.5 else 1.0, formant=(u(700, 2000), u(200, 600),
                 u(1, 4)), swell=(u(0.2, 0.6), u(0.3, 1.0)), cutoff=u(1500, 4000), bright=1.0,
                 vib_depth=u(0, 10))
    elif family == "flute":
        p.update(attack=u(0.04, 0.12), decay=0.2, sustain=u(0.85, 1.0), tilt=u(1.5, 2.5),
                 n_harm=int(rng.integers(3, 7)), vib_depth=u(5, 15), vib_rate=u(4, 6), breath=u(0.015, 0.05))
    elif family == "organ":  # drawbars 8', 4', 2 2/3', 2', 1 3/5', 1 1/3', 1'; no 16' so pitch stays put
        bars = np.where(rng.random(7) < 0.6, u(0, 0.8, 7), 0.0)
        bars[0] = u(0.6, 1.0)
        p.update(n_harm=8, drawbars=bars, vib_depth=u(0, 4) if rng.random() < 0.3 else 0.0)
    elif family == "bell":  # mallet (few, widely spaced partials, short) or bell (dense, with a hum note)
        mallet = rng.random() < 0.5
        ratios = np.array([1, 4.0, 10.0] if mallet else [0.5, 1, 1.19, 1.5, 2.0, 2.51, 3.01])
        p.update(ratios=ratios * u(0.98, 1.02, len(ratios)), amps=u(0.3, 1.0, len(ratios)), attack=0.001,
                 decay=u(0.15, 0.5) if mallet else u(0.4, 1.2), decay_exp=u(0.5, 1.2))
    return p


def harmonic_amps(p, f0, sr, cutoff):
    h = np.arange(1, p["n_harm"] + 1)
    a = h ** -p["tilt"]
    if "drawbars" in p:
        a = np.zeros(len(h))
        a[[0, 1, 2, 3, 4, 5, 7]] = p["drawbars"]
    if "pluck_pos" in p:  # plucking at a fraction of the string notches out those harmonics
        a *= np.abs(np.sin(np.pi * h * p["pluck_pos"])) + 0.05
    if "even" in p:
        a[1::2] *= p["even"]
    if "formant" in p:
        fc, bw, gain = p["formant"]
        a *= 1 + gain * np.exp(-0.5 * ((h * f0 - fc) / bw) ** 2)
    a = a / np.sqrt(1 + (h * f0 / cutoff) ** 4)  # the brightness knob
    return np.where(h * f0 * 1.03 < 0.45 * sr, a, 0.0)  # nothing near Nyquist, even with vibrato


def wavetable(amps, phases):
    """One period holding the given partials, and its slope for linear interpolation."""
    spec = np.zeros(TABLE // 2 + 1, complex)
    spec[1:len(amps) + 1] = amps * np.exp(1j * phases[:len(amps)])
    table = np.fft.irfft(spec, TABLE) * (TABLE / 2)
    return table, np.diff(table, append=table[0])


def render_note(f0, dur, timbre, rng, sr):
    """One note of `dur` seconds (release included) at f0 Hz, unit peak. timbre: family or patch."""
    p = make_patch(timbre, rng) if isinstance(timbre, str) else timbre
    n = max(int(dur * sr), 1)
    t = np.arange(n) / sr
    decay = p["decay"] * min(1.0, (220 / f0) ** 0.5)  # high notes die faster
    env = np.minimum(t / p["attack"], 1) * np.clip((dur - t) / p["release"], 0, 1)
    if p["family"] == "bell":
        y = np.zeros(n)
        for r, a in zip(p["ratios"], p["amps"]):
            d = decay * (p["ratios"][0] / r) ** p["decay_exp"]
            live = min(n, int(7 * d * sr))  # past ~60 dB down nothing is audible: skip the work
            if f0 * r < 0.45 * sr:
                tl = t[:live]
                y[:live] += a * np.exp(-tl / d) * np.sin(2 * np.pi * (f0 * r * tl + rng.uniform()))
        y *= env
        return y / (np.abs(y).max() + 1e-12)
    if p["sustain"] < 1:
        env *= p["sustain"] + (1 - p["sustain"]) * np.exp(-np.maximum(t - p["attack"], 0) / decay)
    if p["vib_depth"]:  # at a 64-sample control rate; fades in after the onset, as players do
        tc = t[::64]
        cents = p["vib_depth"] * np.minimum(tc / 0.4, 1) * np.sin(2 * np.pi * (p["vib_rate"] * tc + rng.uniform()))
        phase = np.cumsum(np.repeat(f0 * 2 ** (cents / 1200), 64)[:n]) / sr
    else:
        phase = f0 * t
    x = (phase + rng.uniform()) * TABLE
    i = x.astype(np.int64)
    frac = x - i
    i &= TABLE - 1  # wrap to one period (TABLE is a power of two)
    dark = harmonic_amps(p, f0, sr, p["cutoff"])
    table, slope = wavetable(dark, p["phases"])
    y = table[i] + frac * slope[i]
    if p["bright"]:  # crossfade in the partials the cutoff removed: pluck attack, brass swell
        w = np.minimum(t / p["swell"][1], 1) if "swell" in p else np.exp(-t / p["bright"])
        if "swell" in p:
            env *= 1 - p["swell"][0] * (1 - w)
        table, slope = wavetable(harmonic_amps(p, f0, sr, 20 * sr) - dark, p["phases"])
        y += w * (table[i] + frac * slope[i])
    if "breath" in p:  # breath noise (x[k+2] - x[k]: band-pass around sr/4, no FFT), chiff at the onset
        noise = rng.standard_normal(n + 2)
        y += p["breath"] / 2 * (noise[2:] - noise[:-2]) * (1 + 3 * np.exp(-t / 0.03))
    y *= env
    return y / (np.abs(y).max() + 1e-12)


def place(buf, x, start):
    """Add x into buf from sample `start`, cropping whatever falls outside."""
    s = int(round(start))
    x, s = (x[-s:], 0) if s < 0 else (x, s)
    buf[s:s + len(x)] += x[:max(0, len(buf) - s)]


def melody(patch, rng, seconds, sr, f0=None):
    """1-4 loosely timed notes spread over the clip, at f0 or at random pitches in MIDI 45-76."""
    buf = np.zeros(int(seconds * sr))
    k = int(rng.integers(1, 5))
    for j in range(k):
        f = f0 or midi_to_hz(int(rng.integers(45, 77)))
        note = rng.uniform(0.6, 1) * render_note(f, seconds / k * rng.uniform(0.6, 1.1), patch, rng, sr)
        place(buf, note, (j + rng.uniform(0, 0.25)) * seconds / k * sr)
    return buf


def make_pitch(i, rng, seconds, sr):
    midi = 48 + i % 24
    patch = make_patch(str(rng.choice(PITCHED)), rng)
    name = f"{NOTE_NAMES[midi % 12]}{midi // 12 - 1}"
    return melody(patch, rng, seconds, sr, f0=midi_to_hz(midi + rng.uniform(-0.2, 0.2))), name


def make_timbre(i, rng, seconds, sr):
    family = FAMILIES[i % len(FAMILIES)]
    return melody(make_patch(family, rng), rng, seconds, sr), family


def make_chord(i, rng, seconds, sr):
    quality = list(CHORDS)[i % len(CHORDS)]
    root = int(rng.integers(48, 65))
    notes = [root + iv for iv in CHORDS[quality]]
    inv = int(rng.integers(len(notes)))
    notes = notes[inv:] + [m + 12 for m in notes[:inv]]
    patch = make_patch(str(rng.choice(PITCHED)), rng)
    strum = rng.uniform(0, 0.04) * rng.choice([-1, 1]) if rng.random() < 0.5 else 0.0
    strikes = [rng.uniform(0, 0.3)] + ([rng.uniform(0.4, 0.6) * seconds] if rng.random() < 0.5 else [])
    buf = np.zeros(int(seconds * sr))
    for s, start in enumerate(strikes):
        _play(buf, notes, start, strikes[s + 1] if s + 1 < len(strikes) else seconds, patch, rng, sr, strum)
    return buf, quality


def add_pad(buf, rng, seconds, sr):
    """Half the time, a held pad under buf: it carries pitch and timbre but no pulse."""
    if rng.random() < 0.5:
        pad_patch = make_patch(str(rng.choice(["organ", "bowed", "flute", "reed"])), rng)
        pad = render_note(midi_to_hz(int(rng.integers(45, 70))), seconds, pad_patch, rng, sr)
        buf += rng.uniform(0.05, 0.15) * np.abs(buf).max() * pad


def make_kit(rng, sr):
    """Kick, snare, hat and click, one random kit per clip."""
    u = rng.uniform
    n = int(0.5 * sr)
    t = np.arange(n) / sr
    f_kick = u(40, 60) + u(60, 120) * np.exp(-t / u(0.02, 0.06))  # decaying pitch sweep
    kick = np.sin(2 * np.pi * np.cumsum(f_kick) / sr) * np.exp(-t / u(0.08, 0.2))
    snare = (u(0.5, 0.8) * band_noise(n, sr, u(800, 1500), u(4000, 8000), rng) * np.exp(-t / u(0.04, 0.12))
             + u(0.2, 0.5) * np.sin(2 * np.pi * u(160, 240) * t) * np.exp(-t / 0.05))
    hat = band_noise(n, sr, u(6000, 8000), 0.45 * sr, rng) * np.exp(-t / u(0.01, 0.05))
    click = (np.sin(2 * np.pi * u(800, 3000) * t) * np.exp(-t / u(0.005, 0.02)) if rng.random() < 0.5  # wood
             else band_noise(n, sr, u(1500, 3000), u(4000, 9000), rng) * np.exp(-t / u(0.003, 0.01)))  # rim
    return dict(kick=kick, snare=snare, hat=hat, click=click)


def make_tempo(i, rng, seconds, sr):
    bpm = round(rng.uniform(*TEMPO_RANGE), 1)
    eighth = 30 / bpm
    kit = make_kit(rng, sr)
    steps = np.arange(8)
    kick = (steps == 0) | ((steps == 4) & (rng.random() < 0.7)) | ((steps % 2 == 1) & (rng.random(8) < 0.15))
    snare = (np.isin(steps, [2, 6]) & (rng.random(8) < 0.85)) | (rng.random(8) < 0.05)
    hat = [steps >= 0, steps % 2 == 0, steps % 2 == 1][int(rng.choice(3, p=[0.5, 0.25, 0.25]))]
    click = (rng.random(8) < 0.25) & (rng.random() < 0.5)
    levels = dict(kick=1.0, snare=rng.uniform(0.6, 0.9), hat=rng.uniform(0.2, 0.4), click=rng.uniform(0.2, 0.4))
    buf = np.zeros(int(seconds * sr))
    offset = rng.uniform(0, 8 * eighth)  # the bar starts anywhere, possibly before the clip
    for k in range(int((seconds + offset) / eighth) + 1):
        for name, hits in (("kick", kick), ("snare", snare), ("hat", hat), ("click", click)):
            if hits[k % 8]:
                jitter = np.clip(rng.normal(0, 0.003), -0.009, 0.009)
                gain = levels[name] * (1.0 if k % 2 == 0 else 0.7) * rng.uniform(0.8, 1)  # beats accented
                place(buf, gain * kit[name], (k * eighth - offset + jitter) * sr)
    add_pad(buf, rng, seconds, sr)
    return buf, f"{bpm:.1f}"


def make_instruments(i, rng, seconds, sr):
    families = sorted(str(f) for f in rng.choice(FAMILIES, int(rng.integers(1, 4)), replace=False))
    buf = np.zeros(int(seconds * sr))
    for family in families:  # each voice normalised, so every family present is audible
        voice = melody(make_patch(family, rng), rng, seconds, sr)
        buf += rng.uniform(0.5, 1) * voice / (np.abs(voice).max() + 1e-12)
    return buf, ";".join(families)


# ----------------------------------------------------------------------------- timed tasks: (audio, annotation lines)


def _chord_notes(root: int, intervals, rng) -> list:
    """MIDI notes of a chord: root in MIDI 48-59, random inversion, sometimes a bass note an octave below."""
    notes = [48 + root % 12 + iv for iv in intervals]
    inv = int(rng.integers(len(notes)))
    notes = notes[inv:] + [m + 12 for m in notes[:inv]]
    return notes + ([48 + root % 12 - 12] if rng.random() < 0.5 else [])


def _play(buf, notes, start, end, patch, rng, sr, strum=0.0):
    """Notes held from start (strummed: upwards for strum > 0, downwards for strum < 0) to end."""
    for j, m in enumerate(notes):
        onset = start + (j if strum >= 0 else len(notes) - 1 - j) * abs(strum)
        f0 = midi_to_hz(m + rng.uniform(-0.05, 0.05))
        place(buf, rng.uniform(0.7, 1) * render_note(f0, end - onset, patch, rng, sr), onset * sr)


def make_chords(i, rng, seconds, sr):
    qualities = dict(maj=(0, 4, 7), min=(0, 3, 7), **{"7": (0, 4, 7, 10), "min7": (0, 3, 7, 10)})
    patch = make_patch(str(rng.choice(PITCHED)), rng)
    buf, lines, t = np.zeros(int(seconds * sr)), [], 0.0
    while t < seconds:
        end = min(seconds, t + rng.uniform(0.8, 2.5))
        if seconds - end < 0.5:  # no sliver of a chord at the end
            end = seconds
        if rng.random() < 0.1:
            label = "N"
        else:
            root = int(rng.integers(12))
            q = str(rng.choice(list(qualities), p=[0.45, 0.35, 0.1, 0.1]))
            label = f"{NOTE_NAMES[root]}:{q}"
            strum = rng.uniform(0, 0.03) if rng.random() < 0.5 else 0.0
            _play(buf, _chord_notes(root, qualities[q], rng), t, end, patch, rng, sr, strum)
        lines.append(f"{t:.6f} {end:.6f} {label}")
        t = end
    return buf, lines


def make_beats(i, rng, seconds, sr):
    bpm = rng.uniform(*TEMPO_RANGE)
    eighth = 30 / bpm
    kit = make_kit(rng, sr)
    steps = np.arange(8)
    kick = (steps == 0) | ((steps == 4) & (rng.random() < 0.7)) | ((steps % 2 == 1) & (rng.random(8) < 0.15))
    snare = (np.isin(steps, [2, 6]) & (rng.random(8) < 0.85)) | ((steps > 0) & (rng.random(8) < 0.05))
    hat = [steps >= 0, steps % 2 == 0, steps % 2 == 1][int(rng.choice(3, p=[0.5, 0.25, 0.25]))]
    levels = dict(kick=1.0, snare=rng.uniform(0.6, 0.9), hat=rng.uniform(0.2, 0.4))
    buf, lines = np.zeros(int(seconds * sr)), []
    offset = rng.uniform(0, 8 * eighth)  # the bar starts anywhere, possibly before the clip
    for k in range(int((seconds + offset) / eighth) + 1):
        t = k * eighth - offset
        if k % 2 == 0 and 0 <= t < seconds:
            lines.append(f"{t:.6f} {(k // 2) % 4 + 1}")
        for name, hits in (("kick", kick), ("snare", snare), ("hat", hat)):
            if hits[k % 8]:
                gain = levels[name] * (1.0 if k % 2 == 0 else 0.7) * rng.uniform(0.8, 1)
                place(buf, gain * kit[name], (t + np.clip(rng.normal(0, 0.003), -0.009, 0.009)) * sr)
    add_pad(buf, rng, seconds, sr)
    return buf, lines


def make_notes(i, rng, seconds, sr):
    patch = make_patch(str(rng.choice(PITCHED)), rng)
    buf, lines = np.zeros(int(seconds * sr)), []
    t, m = rng.uniform(0, 0.3), int(rng.integers(60, 75))
    while t < seconds - 0.2:
        gap = rng.uniform(0.15, 0.6)
        if rng.random() < 0.15:  # a rest
            t += gap
            continue
        dur = min(gap * rng.uniform(0.5, 1.0), seconds - t)
        m = int(np.clip(m + rng.integers(-5, 6), 55, 79))
        place(buf, rng.uniform(0.6, 1) * render_note(midi_to_hz(m + rng.uniform(-0.1, 0.1)), dur, patch, rng, sr), t * sr)
        lines.append(f"{t:.6f} {t + dur:.6f} {midi_to_hz(m):.4f}")
        t += gap
    return buf, lines


MAJOR_DEGREES = [(0, (0, 4, 7)), (5, (0, 4, 7)), (7, (0, 4, 7)), (9, (0, 3, 7)), (2, (0, 3, 7)), (4, (0, 3, 7))]
MINOR_DEGREES = [(0, (0, 3, 7)), (5, (0, 3, 7)), (7, (0, 4, 7)), (8, (0, 4, 7)), (3, (0, 4, 7)), (10, (0, 4, 7))]


def make_keys(i, rng, seconds, sr):
    patch = make_patch(str(rng.choice(PITCHED)), rng)
    n_sections = int(rng.integers(2, 4))
    cuts = np.sort(rng.uniform(0.25, 0.75, n_sections - 1)) if n_sections > 2 else np.array([rng.uniform(0.35, 0.65)])
    bounds = np.r_[0.0, cuts * seconds, seconds]
    buf, lines, key = np.zeros(int(seconds * sr)), [], None
    for s in range(len(bounds) - 1):
        while True:  # a different key from the previous section
            new = (int(rng.integers(12)), "maj" if rng.random() < 0.5 else "min")
            if new != key:
                key = new
                break
        tonic, mode = key
        degrees = MAJOR_DEGREES if mode == "maj" else MINOR_DEGREES
        t, first = bounds[s], True
        while t < bounds[s + 1] - 0.2:  # tonic first, then diatonic chords, the primary ones more often
            end = min(bounds[s + 1], t + rng.uniform(0.5, 1.0))
            d = 0 if first else int(rng.choice(len(degrees), p=[0.25, 0.2, 0.25, 0.1, 0.1, 0.1]))
            _play(buf, _chord_notes(tonic + degrees[d][0], degrees[d][1], rng), t, end, patch, rng, sr)
            t, first = end, False
        lines.append(f"{bounds[s]:.6f} {bounds[s + 1]:.6f} {NOTE_NAMES[tonic]}:{mode}")
    return buf, lines


ANNOTATION_SUFFIX = dict(chords=".lab", beats=".beats", notes=".notes", keys=".lab")


MAKERS = dict(pitch=make_pitch, timbre=make_timbre, chord=make_chord, tempo=make_tempo,
              instruments=make_instruments, chords=make_chords, beats=make_beats, notes=make_notes, keys=make_keys)


def finish(x, rng, sr):
    """Random peak level, a low noise floor, and a short fade so truncated notes don't click."""
    peak = 10 ** (rng.uniform(-20, -6) / 20)
    x = x / (np.abs(x).max() + 1e-12) * peak
    noise = rng.standard_normal(len(x), dtype=np.float32)
    if rng.random() < 0.5:  # pink: 1/f power
        f = np.fft.rfftfreq(len(x), 1 / sr)
        noise = np.fft.irfft(np.fft.rfft(noise) / np.sqrt(np.maximum(f, 20.0)), len(x))
    x = x + noise / noise.std() * peak * 10 ** (rng.uniform(-50, -35) / 20)
    x[-int(0.01 * sr):] *= np.linspace(1, 0, int(0.01 * sr))
    return np.clip(x, -1, 1)


def assign_splits(groups, rng):
    """60/20/20 train/valid/test inside each group, so each group with 3+ members is in every split."""
    groups = np.asarray(groups)
    splits = np.empty(len(groups), dtype=object)
    for g in sorted(set(groups.tolist())):  # sorted: the order must not depend on hashing
        idx = rng.permutation(np.flatnonzero(groups == g))
        n_eval = max(1, round(0.2 * len(idx))) if len(idx) >= 3 else 0
        n_train = len(idx) - 2 * n_eval
        splits[idx[:n_train]] = "train"
        splits[idx[n_train:n_train + n_eval]] = "valid"
        splits[idx[n_train + n_eval:]] = "test"
    return splits.tolist()


def main(argv=None):
    """Write the tasks' audio, annotations and CSVs."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path, help="folder for the T/ audio folders and T.csv files")
    ap.add_argument("--tasks", default=",".join(CLIP_TASKS),  # one value, so that OUT_DIR may follow it
                    help="comma-separated subset of " + ",".join(TASKS) + " (default: the clip tasks)")
    ap.add_argument("--n", type=int, default=600, help="clips per task (default 600)")
    ap.add_argument("--seconds", type=float, default=4.0, help="clip length in seconds (tempo clips "
                    "are lengthened to fit 6 beats at 70 BPM, timed tasks to 6 s; default 4.0)")
    ap.add_argument("--sr", type=int, default=24000, help="sample rate in Hz (default 24000, MERT's rate)")
    ap.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default 0)")
    args = ap.parse_args(argv)
    # glibc hands each freed ~1 MB temporary back to the OS and page-faults it in again on the next one,
    # which doubled the run time; freeing one 28 MB block first raises its thresholds so they stay.
    np.empty(3_500_000)
    tasks = [t for t in args.tasks.replace(",", " ").split()]
    if not tasks or set(tasks) - set(TASKS):
        ap.error(f"--tasks must name some of {','.join(TASKS)}")
    if args.n < 1 or args.seconds <= 0.5 or args.sr < 8000 or args.seed < 0:
        ap.error("need --n >= 1, --seconds > 0.5, --sr >= 8000 and --seed >= 0")
    for name in tasks:
        index = TASKS.index(name)
        seconds = max(args.seconds, TEMPO_SECONDS) if name == "tempo" else args.seconds
        if name in TIMED_TASKS:
            seconds = max(args.seconds, TIMED_SECONDS)
        (args.out_dir / name).mkdir(parents=True, exist_ok=True)
        paths = [f"{name}/{name}_{i:05d}.flac" for i in range(args.n)]
        labels = []
        for i, path in enumerate(paths):
            rng = np.random.default_rng([args.seed, index, 0, i])
            x, label = MAKERS[name](i, rng, seconds, args.sr)
            if name in TIMED_TASKS:  # the label is the annotation file, written beside the audio
                ann = path[:-len(".flac")] + ANNOTATION_SUFFIX[name]
                (args.out_dir / ann).write_text("\n".join(label) + "\n")
                label = ann
            labels.append(label)
            sf.write(args.out_dir / path, finish(x, rng, args.sr).astype(np.float32), args.sr, subtype="PCM_16")
        groups = labels  # tempo: stratify by decile so every split spans the tempo range
        if name == "tempo":
            groups = np.argsort(np.argsort([float(b) for b in labels])) * 10 // args.n
        elif name in TIMED_TASKS:
            groups = [0] * args.n
        splits = assign_splits(groups, np.random.default_rng([args.seed, index, 1]))
        csv_path = args.out_dir / f"{name}.csv"
        with open(csv_path, "w", newline="") as f:
            csv.writer(f).writerows([("path", "label", "split"), *zip(paths, labels, splits)])
        print(f"{name}: {args.n} clips -> {csv_path}")


if __name__ == "__main__":
    main()
