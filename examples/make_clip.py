"""Synthesise examples/clip.flac: 6 s of a small band (chords, bass, hi-hat, kick) at 24 kHz, free of any licence.

    python examples/make_clip.py
"""
from pathlib import Path

import numpy as np
import soundfile as sf

SR, BPM = 24000, 120


def note(f0, dur, harmonics=6, decay=3.0):
    """A plucked harmonic tone: partials 1..harmonics at 1/h amplitude, exponential decay."""
    t = np.arange(int(dur * SR)) / SR
    x = sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, harmonics + 1))
    return x * np.exp(-decay * t)


def main():
    rng = np.random.default_rng(0)
    beat = 60 / BPM
    out = np.zeros(int(6 * SR))
    chords = [(220.0, 277.18, 329.63), (196.0, 246.94, 293.66), (174.61, 220.0, 261.63), (196.0, 246.94, 293.66)]
    for bar, chord in enumerate(chords * 2):  # a new chord every 0.75 s
        start = int(bar * 0.75 * SR)
        for f in chord:
            seg = 0.15 * note(f, 1.2)
            end = min(start + len(seg), len(out))
            out[start:end] += seg[:end - start]
        bass = 0.3 * note(chord[0] / 2, 0.7, harmonics=3, decay=4)
        end = min(start + len(bass), len(out))
        out[start:end] += bass[:end - start]
    for k in range(int(6 / (beat / 2))):  # hi-hat on eighths, kick on beats
        s = int(k * beat / 2 * SR)
        hat = 0.08 * rng.standard_normal(int(0.03 * SR)) * np.exp(-np.arange(int(0.03 * SR)) / 200)
        out[s:s + len(hat)] += hat[:len(out) - s]
        if k % 2 == 0:
            t = np.arange(int(0.15 * SR)) / SR
            kick = 0.5 * np.sin(2 * np.pi * (50 + 100 * np.exp(-30 * t)) * t) * np.exp(-20 * t)
            out[s:s + len(kick)] += kick[:len(out) - s]
    out = 0.8 * out / np.abs(out).max()
    sf.write(Path(__file__).with_name("clip.flac"), out.astype(np.float32), SR, subtype="PCM_16")


if __name__ == "__main__":
    main()
