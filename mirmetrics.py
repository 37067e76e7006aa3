"""MIR annotations and their standard metrics, in numpy: the definitions of mir_eval 0.8.2, written afresh.

    chord_scores(ref_intervals, ref_labels, est_intervals, est_labels)  # weighted chord symbol recall
    event_f_measure(ref_times, est_times, window=0.07)                 # beat (70 ms) or onset (50 ms) F-measure
    note_scores(ref_intervals, ref_hz, est_intervals, est_hz)          # note onset F-measure, with and without pitch
    labels_at(intervals, labels, times)                                # segment labels at frame times
    roc_auc(y, scores), average_precision(y, scores)                   # tagging, one binary column
    pick_peaks(act, radius), frames_to_segments(labels, times, end)    # frame-wise outputs -> annotations
    best_threshold(score, key)                                         # an activation threshold chosen on data

Decisions, each as mir_eval does it (tests/test_metrics.py compares every metric with mir_eval itself):
- Chord labels follow Harte et al.'s grammar (`C:maj`, `A:min7/5`, `Eb:(3,5)`, `G:7(*5,b9)`, `N`, `X`) and are
  encoded as root, 12-bit pitch-class set relative to the root (bass included) and bass; degrees of an octave
  or more (9, 11, 13) fall outside the 12 bits, as in mir_eval's comparisons. Estimated segments are cropped
  or padded with `N` to the reference's span, both are cut at every boundary of either, and each comparison
  is weighted by the piece's duration; references a level cannot score (`X`; non-maj/min chords at majmin;
  chords of fewer than 3 notes at mirex) are left out of that level's total.
- Events are matched one to one by a maximum bipartite matching (not greedily) within the window, with
  mir_eval's exact float rule for the window's edges. Beats before a minimum time are dropped only if asked
  (mir_eval's evaluate() drops those before 5 s; its f_measure() does not).
- Notes match when their onsets are within 50 ms (distances rounded to 0.1 ms, as mir_eval does) and, for the
  note F-measure, their pitches within 50 cents; offsets are not scored.
- Event scores over a data set are the mean of each piece's (MIREX's averaging); chord recall is summed over
  pieces, duration-weighted.
"""

import re

import numpy as np


class AnnotationError(ValueError):
    """A malformed annotation file or label, as one line that names it."""


# ----------------------------------------------------------------------------- chord grammar

_NOTES = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
_DEGREES = {str(d): s for d, s in zip(range(1, 14), (0, 2, 4, 5, 7, 9, 11, 12, 14, 16, 17, 19, 21))}
# Shorthand -> semitones above the root that fit in one octave (mir_eval's QUALITIES: the extended chords keep
# only their notes below the octave, so C:9 and C:7 have the same pitch-class set).
QUALITIES = {
    "maj": (0, 4, 7), "min": (0, 3, 7), "aug": (0, 4, 8), "dim": (0, 3, 6), "sus4": (0, 5, 7), "sus2": (0, 2, 7),
    "7": (0, 4, 7, 10), "maj7": (0, 4, 7, 11), "min7": (0, 3, 7, 10), "minmaj7": (0, 3, 7, 11),
    "maj6": (0, 4, 7, 9), "min6": (0, 3, 7, 9), "dim7": (0, 3, 6, 9), "hdim7": (0, 3, 6, 10),
    "maj9": (0, 4, 7, 11), "min9": (0, 3, 7, 10), "9": (0, 4, 7, 10), "min11": (0, 3, 7, 10), "11": (0, 4, 7, 10),
    "maj13": (0, 4, 7, 11), "min13": (0, 3, 7, 10), "13": (0, 4, 7, 10), "1": (0,), "5": (0, 7), "": (),
}
# The grammar also spells aug7 and maj11, which mir_eval cannot encode; they are rejected with a clear error.
_SHORTHANDS = sorted(set(QUALITIES) - {""} | {"aug7", "maj11"}, key=len, reverse=True)
_DEG = r"(?:b*|#*)(?:1[0-3]|[1-9])"
_DEGS = rf"\*?{_DEG}(?:,\*?{_DEG})*"
_QUALITY = rf"(?:{'|'.join(_SHORTHANDS)})(?:\({_DEGS}\))?"  # a shorthand, then degrees in brackets if any
_CHORD = re.compile(rf"[NX]|[A-G](?:b*|#*)(?::(?:{_QUALITY}|\({_DEGS}\)))?(?:/{_DEG})?")
NO_CHORD = "N"


def _degree(text: str) -> int:
    """'b3' -> 3, '#5' -> 8, '9' -> 14: semitones above the root, not wrapped."""
    body = text.lstrip("b#")
    return _DEGREES[body] + text.count("#") - text.count("b")


def encode_chord(label: str) -> tuple[int, np.ndarray, int]:
    """Chord label -> (root 0-11, 12-bit pitch-class set relative to the root [12] int, bass 0-11).

    N is (-1, zeros, -1) and X (-1, all -1, -1). Raises AnnotationError for a label outside the grammar."""
    if not _CHORD.fullmatch(label):
        raise AnnotationError(f"chord label {label!r} is not in Harte et al.'s grammar")
    if label == "N":
        return -1, np.zeros(12, np.int64), -1
    if label == "X":
        return -1, -np.ones(12, np.int64), -1
    label, _, bass = label.partition("/")
    label, _, degrees = label.partition("(")
    degrees = set(degrees.rstrip(")").split(",")) if degrees else set()  # a set: a repeated degree counts once
    note, _, quality = label.partition(":")
    if quality in ("aug7", "maj11"):
        raise AnnotationError(f"chord label {label!r}: quality {quality!r} has no pitch-class set in mir_eval")
    if not quality:
        quality = "" if degrees else "maj"  # 'C' is C:maj; 'C:(3,5)' has only the root and the degrees listed
    root = (_NOTES[note[0]] + note.count("#") - note.count("b")) % 12
    bits = np.zeros(12, np.int64)
    bits[list(QUALITIES[quality])] = 1
    bits[0] = 1
    for d in degrees:  # added (+1) or omitted (*, -1) degrees; those an octave or more up are outside the bitmap
        s = _degree(d.lstrip("*"))
        if s < 12:
            bits[s % 12] += -1 if d.startswith("*") else 1  # 'b1' is -1 semitones: pitch class 11
    bits = (bits > 0).astype(np.int64)
    bass = _degree(bass) % 12 if bass else 0
    bits[bass] = 1  # the bass note sounds, whatever the quality says
    return root, bits, bass


def _encode_many(labels):
    cache = {}
    roots, bits = np.zeros(len(labels), np.int64), np.zeros((len(labels), 12), np.int64)
    for i, lab in enumerate(labels):
        if lab not in cache:
            cache[lab] = encode_chord(lab)
        roots[i], bits[i], _ = cache[lab]
    return roots, bits


def _absolute(roots: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Relative sets [n, 12] -> absolute pitch classes [n, 12] (every nonzero bit, X's -1s too, rotated by root)."""
    n = np.arange(12)
    idx = (n[None, :] - roots[:, None]) % 12  # absolute class c holds relative bit c - root
    return (np.take_along_axis(bits, idx, 1) != 0).astype(np.int64)


# Pitch-class bits 0-7 (root up to the fifth, relative to the root) of a major and of a minor triad: what the
# majmin level compares, so C:7 and A:min7/5 count as their triads.
MAJ_TRIAD, MIN_TRIAD = np.array([1, 0, 0, 0, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 0, 0, 0, 1])


def compare_chords(ref_labels, est_labels, level: str) -> np.ndarray:
    """Per-pair score at a level (root, majmin, mirex): 1 right, 0 wrong, -1 where the reference is not scored."""
    rr, rb = _encode_many(ref_labels)
    er, eb = _encode_many(est_labels)
    if level == "root":
        score = (rr == er).astype(float)
    elif level == "majmin":  # root and the notes up to the fifth (indices 0-7) must agree
        score = ((rr == er) & (rb[:, :8] == eb[:, :8]).all(1)).astype(float)
        scored = (rb[:, :8] == MAJ_TRIAD).all(1) | (rb[:, :8] == MIN_TRIAD).all(1) | ((rr < 0) & (rb == 0).all(1))
        score[~scored] = -1
    elif level == "mirex":  # at least 3 shared pitch classes (an estimated X shares all 12, as in mir_eval)
        score = ((_absolute(rr, rb) * _absolute(er, eb)).sum(1) >= 3).astype(float)
        score[(rr < 0) & (er < 0)] = 1.0  # N against N (or X)
        n = (rb > 0).sum(1)
        score[((n > 0) & (n < 3))] = -1
    else:
        raise ValueError(f"unknown chord level {level!r}")
    score[(rb < 0).any(1)] = -1  # X is never scored
    return score


CHORD_LEVELS = ("root", "majmin", "mirex")

NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
# MIREX's majmin vocabulary: N and the 24 major and minor triads.
MAJMIN_VOCAB = ["N"] + [f"{n}:maj" for n in NOTE_NAMES] + [f"{n}:min" for n in NOTE_NAMES]


def majmin_index(label: str) -> int | None:
    """A chord's index in MAJMIN_VOCAB: N is 0, a chord whose notes up to the fifth are a major or minor triad
    (C:7, A:min7/5) is that triad; None for the others (dim, aug, sus, X), which the majmin level does not name."""
    root, bits, _ = encode_chord(label)
    if root < 0:
        return 0 if label == NO_CHORD else None
    if (bits[:8] == MAJ_TRIAD).all():
        return 1 + root
    if (bits[:8] == MIN_TRIAD).all():
        return 13 + root
    return None


def _fit_span(iv: np.ndarray, labels: list, t_min: float, t_max: float, fill: str):
    """Crop the estimated segments to [t_min, t_max] and pad with `fill` where they fall short (mir_eval's rule)."""
    if iv.size == 0:
        return np.array([[t_min, t_max]]), [fill]
    labels = list(labels)
    ends_after = np.flatnonzero(iv[:, 1] >= t_min)
    if len(ends_after):
        iv, labels = iv[ends_after[0]:], labels[ends_after[0]:]
    iv = np.maximum(t_min, iv)
    if iv.min() > t_min:
        iv, labels = np.vstack([[t_min, iv.min()], iv]), [fill] + labels
    starts_after = np.flatnonzero(iv[:, 0] > t_max)
    if len(starts_after):
        iv, labels = iv[:starts_after[0]], labels[:starts_after[0]]
    if iv.size == 0:  # every estimate starts after the reference ends (mir_eval would fail here)
        return np.array([[t_min, t_max]]), [fill]
    iv = np.minimum(t_max, iv)
    if iv.max() < t_max:
        iv, labels = np.vstack([iv, [iv.max(), t_max]]), labels + [fill]
    return iv, labels


def _label_at(starts: np.ndarray, labels: list, t: np.ndarray) -> list:
    """For each time, the label of the last segment (in file order) that starts at or before it."""
    ok = t[:, None] >= starts[None, :]
    last = len(starts) - 1 - np.argmax(ok[:, ::-1], axis=1)
    return [labels[i] for i in last]


def common_segments(ref_iv, ref_labels, est_iv, est_labels, fill: str = NO_CHORD):
    """(durations [n], ref labels, est labels) on the pieces between every boundary of either annotation."""
    ref_iv, est_iv = np.asarray(ref_iv, float).reshape(-1, 2), np.asarray(est_iv, float).reshape(-1, 2)
    est_iv, est_labels = _fit_span(est_iv, est_labels, ref_iv.min(), ref_iv.max(), fill)
    bounds = np.unique(np.concatenate([ref_iv.ravel(), est_iv.ravel()]))
    t0 = bounds[:-1]
    return np.diff(bounds), _label_at(ref_iv[:, 0], list(ref_labels), t0), _label_at(est_iv[:, 0], est_labels, t0)


def chord_scores(ref_iv, ref_labels, est_iv, est_labels, levels=CHORD_LEVELS) -> dict:
    """Weighted chord symbol recall per level for one piece: {level: (correct seconds, scored seconds)}.

    correct / scored is mir_eval.chord.evaluate's score (0 where nothing is scored); summing both over pieces
    gives the dataset's duration-weighted recall, as MIREX reports it."""
    dur, ref, est = common_segments(ref_iv, ref_labels, est_iv, est_labels)
    out = {}
    for level in levels:
        s = compare_chords(ref, est, level)
        ok = s >= 0
        out[level] = (float((s[ok] * dur[ok]).sum()), float(dur[ok].sum()))
    return out


def ratio(num: float, den: float) -> float:
    """num / den, 0 when den is 0 (mir_eval's convention for empty references)."""
    return num / den if den > 0 else 0.0


# ----------------------------------------------------------------------------- events and notes


def max_matching(edges: list[list[int]], n_right: int) -> int:
    """Size of a maximum matching of a bipartite graph (left u -> right neighbours edges[u]); augmenting paths."""
    owner = [-1] * n_right
    size = 0
    for u0 in range(len(edges)):
        if not edges[u0]:
            continue
        seen = [False] * n_right
        stack = [[u0, 0]]  # depth-first search for an augmenting path, iterative (paths can be long)
        while stack:
            u, k = stack[-1]
            if k == len(edges[u]):
                stack.pop()
                continue
            stack[-1][1] += 1
            v = edges[u][k]
            if seen[v]:
                continue
            seen[v] = True
            if owner[v] < 0:  # free: flip the path, each left vertex on the stack takes the vertex it last tried
                for uu, kk in stack:
                    owner[edges[uu][kk - 1]] = uu
                size += 1
                break
            stack.append([owner[v], 0])
    return size


def _f(matched: int, n_ref: int, n_est: int) -> tuple[float, float, float]:
    if n_ref == 0 or n_est == 0:
        return 0.0, 0.0, 0.0
    p, r = matched / n_est, matched / n_ref
    return (0.0 if p == 0 and r == 0 else 2 * p * r / (p + r)), p, r


def event_f_measure(ref, est, window: float = 0.07, min_time: float = 0.0) -> tuple[float, float, float]:
    """(F-measure, precision, recall) of estimated event times against reference times, one-to-one within
    +-window seconds: mir_eval.beat.f_measure (window 0.07) and mir_eval.onset.f_measure (0.05).
    min_time > 0 first drops events before it (mir_eval.beat.trim_beats, 5 s in its evaluate())."""
    ref, est = np.sort(np.asarray(ref, float)), np.sort(np.asarray(est, float))
    ref, est = ref[ref >= min_time], est[est >= min_time]
    # est j hits ref i when est - window <= ref <= est + window, computed in this order (mir_eval's
    # searchsorted): |ref - est| <= window can differ in the last bit where a distance is exactly the window
    lo = np.searchsorted(ref, est - window, side="left")
    hi = np.searchsorted(ref, est + window, side="right")
    edges = [list(range(a, b)) for a, b in zip(lo, hi)]
    return _f(max_matching(edges, len(ref)), len(ref), len(est))


def mean_beat_f(refs: list, ests: list, window: float = 0.07, min_time: float = 0.0) -> float:
    """Mean over pieces of event_f_measure's F (mir_eval scores each file; MIREX averages the files)."""
    return float(np.mean([event_f_measure(r, e, window, min_time)[0] for r, e in zip(refs, ests)]))


def note_scores(ref_iv, ref_hz, est_iv, est_hz, onset_tol: float = 0.05, pitch_tol: float = 50.0) -> dict:
    """Note-level scores without offsets: onset_f ignores pitch (mir_eval.transcription.onset_precision_recall_f1);
    note_f also needs the pitch within pitch_tol cents (precision_recall_f1_overlap with offset_ratio=None)."""
    ref_on, est_on = np.asarray(ref_iv, float).reshape(-1, 2)[:, 0], np.asarray(est_iv, float).reshape(-1, 2)[:, 0]
    out = {}
    if len(ref_on) == 0 or len(est_on) == 0:
        return {"onset_f": 0.0, "onset_p": 0.0, "onset_r": 0.0, "note_f": 0.0, "note_p": 0.0, "note_r": 0.0}
    # distances rounded to 4 decimals, so that a note exactly 50 ms off counts as within 50 ms (mir_eval)
    onset_hit = np.around(np.abs(np.subtract.outer(ref_on, est_on)), 4) <= onset_tol
    cents = np.abs(1200 * np.subtract.outer(np.log2(np.asarray(ref_hz, float)), np.log2(np.asarray(est_hz, float))))
    for name, hit in (("onset", onset_hit), ("note", onset_hit & (cents <= pitch_tol))):
        edges = [np.flatnonzero(col).tolist() for col in hit.T]  # est j -> the refs it may match
        f, p, r = _f(max_matching(edges, len(ref_on)), len(ref_on), len(est_on))
        out.update({f"{name}_f": f, f"{name}_p": p, f"{name}_r": r})
    return out


def mean_note_scores(refs: list, ests: list) -> dict:
    """Mean over pieces of note_scores' onset_f and note_f; each piece's ref and est are (intervals, Hz)."""
    scores = [note_scores(r[0], r[1], e[0], e[1]) for r, e in zip(refs, ests)]
    return {k: float(np.mean([s[k] for s in scores])) for k in ("onset_f", "note_f")}


# ----------------------------------------------------------------------------- frame-wise outputs to annotations

# activation thresholds to choose from (low ones too: sparse onset targets give small activations)
THRESHOLDS = np.r_[0.01, 0.02, 0.03, np.round(np.arange(0.05, 0.96, 0.05), 2)]


def pick_peaks(act: np.ndarray, radius: int) -> np.ndarray:
    """Local maxima along time of act [T, ...]: the first frame of the largest value within +-radius frames."""
    pad = np.full((radius,) + act.shape[1:], -np.inf)
    win = np.lib.stride_tricks.sliding_window_view(np.concatenate([pad, act, pad]), 2 * radius + 1, axis=0)
    return (act > win[..., :radius].max(-1)) & (act >= win[..., radius:].max(-1))


def best_threshold(score, key: str, thresholds=THRESHOLDS) -> tuple[float, dict]:
    """(threshold, its scores): the threshold whose scores, score(th) -> dict, are best at `key` (the lowest
    among equals); choose it on validation data and apply it to the test data."""
    by_th = {th: score(th) for th in thresholds}
    best = max(thresholds, key=lambda th: (by_th[th][key], -th))
    return float(best), by_th[best]


def frames_to_segments(labels: list, times: np.ndarray, end: float):
    """Frame labels -> (intervals, labels): a segment per run, cut half-way between frame centres; the first
    starts at 0 and the last runs to `end` (the clip's end)."""
    change = [t for t in range(1, len(labels)) if labels[t] != labels[t - 1]]
    cuts = [(times[t - 1] + times[t]) / 2 for t in change]
    starts = np.array([0.0] + cuts)
    ends = np.array(cuts + [max(end, times[-1])])
    return np.stack([starts, ends], 1), [labels[0]] + [labels[t] for t in change]


# ----------------------------------------------------------------------------- segments at frame times


def labels_at(intervals, labels, times, fill=None) -> list:
    """The label at each (sorted) time: segments are closed [start, end], a later one in the file wins a shared
    time, times outside every segment get `fill` (mir_eval.util.interpolate_intervals)."""
    times = np.asarray(times, float)
    out = [fill] * len(times)
    iv = np.asarray(intervals, float).reshape(-1, 2)
    lo = np.searchsorted(times, iv[:, 0], side="left")
    hi = np.searchsorted(times, iv[:, 1], side="right")
    for a, b, lab in zip(lo, hi, labels):
        out[a:b] = [lab] * (b - a)
    return out


def frame_accuracy(ref: list, est: list) -> tuple[int, int]:
    """(frames where est equals ref, frames with a reference label): ref None is unannotated and not counted."""
    n = sum(r is not None for r in ref)
    return sum(r is not None and r == e for r, e in zip(ref, est)), n


# ----------------------------------------------------------------------------- tagging


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the ROC curve for one binary column (Mann-Whitney with average ranks for ties)."""
    pos = y > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    start = 0
    for i in range(1, len(s) + 1):  # average the ranks of tied scores
        if i == len(s) or sorted_s[i] != sorted_s[start]:
            ranks[order[start:i]] = 0.5 * (start + i - 1) + 1
            start = i
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """Average precision for one binary column: sum over score thresholds of (recall step) x precision."""
    n_pos = int((y > 0.5).sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order] > 0.5, s[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall_step = np.diff(np.r_[0, tp]) / n_pos
    return float((recall_step * precision).sum())


# ----------------------------------------------------------------------------- annotation files


def _rows(path, min_cols: int, max_cols: int, split: int):
    """Non-blank, non-comment lines of a whitespace-separated file -> (line number, fields)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: cannot read ({e})") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split(None, split)
        if not rows and not any(_is_number(f) for f in fields):  # a header row (MAPS: OnsetTime OffsetTime MidiPitch)
            rows.append(None)
            continue
        if not min_cols <= len(fields) <= max_cols:
            raise AnnotationError(f"{path}: line {n}: expected {min_cols}-{max_cols} columns, got {line.strip()!r}")
        rows.append((n, fields))
    return rows[1:] if rows and rows[0] is None else rows


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _time(path, n, text) -> float:
    try:
        t = float(text)
    except ValueError:
        t = float("nan")
    if not np.isfinite(t) or t < 0:
        raise AnnotationError(f"{path}: line {n}: {text!r} is not a time in seconds >= 0")
    return t


def read_segments(path, chords: bool = False):
    """`start end label` lines (.lab: chords, keys, sections) -> (intervals [n, 2], labels); labels may hold
    spaces. chords=True checks every label against the chord grammar."""
    iv, labels = [], []
    for n, f in _rows(path, 3, 3, 2):
        s, e = _time(path, n, f[0]), _time(path, n, f[1])
        if e <= s:
            raise AnnotationError(f"{path}: line {n}: the segment ends ({e}) before it starts ({s})")
        if chords:
            try:
                encode_chord(f[2].strip())
            except AnnotationError as err:
                raise AnnotationError(f"{path}: line {n}: {err}") from None
        iv.append((s, e))
        labels.append(f[2].strip())
    if not iv:
        raise AnnotationError(f"{path}: no segments")
    return np.array(iv, float), labels


def read_beats(path):
    """`time [beat-in-bar]` lines -> (sorted times [n], positions [n] int or None when no line gives one)."""
    times, pos = [], []
    for n, f in _rows(path, 1, 2, 1):
        times.append(_time(path, n, f[0]))
        if len(f) > 1:
            try:
                p = float(f[1])
            except ValueError:
                p = float("nan")
            if not (np.isfinite(p) and p == int(p) and p >= 1):
                raise AnnotationError(f"{path}: line {n}: beat-in-bar {f[1]!r} is not a whole number >= 1")
            pos.append(int(p))
        else:
            pos.append(None)
    if pos and any(p is not None for p in pos) and any(p is None for p in pos):
        raise AnnotationError(f"{path}: some beats have a beat-in-bar number and some do not")
    order = np.argsort(times, kind="stable")
    times = np.array(times, float)[order]
    return times, (np.array(pos, int)[order] if pos and pos[0] is not None else None)


def midi_to_hz(m):
    """MIDI note number(s) -> Hz (A4 = 69 = 440 Hz)."""
    return 440.0 * 2.0 ** ((np.asarray(m, float) - 69) / 12)


def hz_to_midi(hz) -> np.ndarray:
    """Hz -> the nearest MIDI note number(s), int."""
    return np.round(69 + 12 * np.log2(np.asarray(hz) / 440.0)).astype(int)


def read_notes(path, unit: str = "hz"):
    """`onset offset pitch` lines -> (intervals [n, 2], pitches in Hz [n]); unit 'hz' (MIREX) or 'midi'."""
    iv, pitch = [], []
    for n, f in _rows(path, 3, 3, 2):
        s, e = _time(path, n, f[0]), _time(path, n, f[1])
        try:
            p = float(f[2])
        except ValueError:
            p = float("nan")
        if e <= s or not np.isfinite(p) or p <= 0:
            raise AnnotationError(f"{path}: line {n}: need onset < offset and a pitch > 0, got {' '.join(f)!r}")
        iv.append((s, e))
        pitch.append(p)
    pitch = np.array(pitch, float)
    return np.array(iv, float).reshape(-1, 2), midi_to_hz(pitch) if unit == "midi" else pitch


def read_annotation(kind: str, path, pitch_unit: str = "hz"):
    """The annotation file of one piece for a kind of task: chords and segments (read_segments), beats
    (read_beats) or notes (read_notes, pitches in `pitch_unit`)."""
    if kind in ("chords", "segments"):
        return read_segments(path, chords=kind == "chords")
    if kind == "beats":
        return read_beats(path)
    if kind == "notes":
        return read_notes(path, pitch_unit)
    raise ValueError(f"unknown annotation kind {kind!r}")
