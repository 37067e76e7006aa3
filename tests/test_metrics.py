"""mirmetrics.py against mir_eval 0.8.2 itself, on generated and adversarial annotations, and its file readers;
the tagging metrics and the threshold choice by hand."""
import warnings

import numpy as np
import pytest

import mirmetrics as mm
from conftest import need

ROOTS = ["C", "D", "E", "F", "G", "A", "B"]
QUALS = [q for q in mm.QUALITIES if q] + [""]


def random_chord(g: np.random.Generator) -> str:
    """A label from all of Harte's grammar that mir_eval can encode: accidentals, omissions, extensions, bass."""
    u = g.random()
    if u < 0.08:
        return "N"
    if u < 0.12:
        return "X"
    root = ROOTS[g.integers(7)] + ["", "#", "b", "##", "bb"][g.choice(5, p=[0.6, 0.15, 0.15, 0.05, 0.05])]
    deg = lambda: ["", "b", "#", "bb"][g.choice(4, p=[0.6, 0.2, 0.15, 0.05])] + str(g.integers(1, 14))  # noqa: E731
    q = QUALS[g.integers(len(QUALS))]
    label = root
    if q == "" or g.random() < 0.3:  # degrees: added, or omitted with *
        degs = ",".join(("*" if q and g.random() < 0.3 else "") + deg() for _ in range(g.integers(1, 4)))
        label += f":{q}({degs})"
    elif g.random() < 0.7:
        label += f":{q}"
    if g.random() < 0.25:
        label += "/" + deg()
    return label


def random_segments(g, labels_fn, t0=None, t1=None, gaps=False):
    t0 = g.uniform(0, 2) if t0 is None else t0
    t1 = t0 + g.uniform(3, 20) if t1 is None else t1
    n = int(g.integers(1, 12))
    b = np.sort(np.r_[t0, g.uniform(t0, t1, n - 1), t1])
    if g.random() < 0.3:  # boundaries on a coarse grid, so that they coincide with the other annotation's
        b = np.unique(np.round(b * 2) / 2)
    iv = np.stack([b[:-1], b[1:]], 1)
    if gaps and len(iv) > 2:
        iv = iv[np.sort(g.choice(len(iv), len(iv) - 1, replace=False))]  # drop one: a gap
    iv = iv[iv[:, 1] > iv[:, 0]]
    return iv, [labels_fn(g) for _ in iv]


def test_chord_grammar_and_encoding_match_mir_eval():
    chord = need("mir_eval.chord")
    g = np.random.default_rng(0)
    labels = [random_chord(g) for _ in range(600)]
    labels += ["C", "C:(3,5)", "C:(*3)", "C:maj(*1)", "C:maj(*3,*3)", "C:maj(3,*3)", "C:maj(b1)", "C:min(#7)",
               "C:9", "C:maj(9)", "C:7/b7", "Cbb:min/#4", "B#:hdim7/13", "C:5/3", "C:1", "Fb:sus2(*5,b9)/9"]
    for lab in labels:
        root, bits, bass = mm.encode_chord(lab)
        r2, b2, s2 = chord.encode(lab)
        assert (root, bass) == (r2, s2) and np.array_equal(bits, b2), lab
    for bad in ["H", "c:maj", "C:Maj", "C:maj7(", "C:(14)", "C/*3", "N/5", "C:", "C:aug7", "C:maj11", "C maj"]:
        with pytest.raises(mm.AnnotationError):
            mm.encode_chord(bad)
        with pytest.raises(chord.InvalidChordException):
            chord.encode(bad)


def test_chord_comparisons_match_mir_eval():
    chord = need("mir_eval.chord")
    g = np.random.default_rng(1)
    for case in range(30):
        n = 40
        if case % 3 == 0:  # the same roots with other qualities: majmin and mirex disagree here
            ref = [random_chord(g) for _ in range(n)]
            est = [r.split(":")[0].split("/")[0] + ":" + ["maj", "min", "7", "dim", "sus4"][g.integers(5)]
                   if r not in "NX" else r for r in ref]
        else:
            ref, est = [random_chord(g) for _ in range(n)], [random_chord(g) for _ in range(n)]
        for level in mm.CHORD_LEVELS:
            np.testing.assert_array_equal(mm.compare_chords(ref, est, level), getattr(chord, level)(ref, est),
                                          err_msg=f"case {case} {level}")


def test_weighted_chord_recall_matches_mir_eval_evaluate():
    chord = need("mir_eval.chord")
    g = np.random.default_rng(2)
    vocab = lambda g: random_chord(g) if g.random() < 0.5 else ["N", "C:maj", "A:min", "G", "C:min7", "A:maj/3"][g.integers(6)]  # noqa: E731
    cases = []
    for case in range(40):
        ref_iv, ref_lab = random_segments(g, vocab, gaps=case % 4 == 1)
        kind = case % 5  # the estimate: same span, shorter, longer, starting later, or one segment
        t0, t1 = ref_iv.min(), ref_iv.max()
        span = {0: (t0, t1), 1: (t0 + 1, t1 - 1), 2: (0.0, t1 + 3), 3: (t0 + 0.5, t1 + 1), 4: (t0, t1)}[kind]
        est_iv, est_lab = random_segments(g, vocab, *span)
        if kind == 4:
            est_iv, est_lab = est_iv[:1], est_lab[:1]
        cases.append((ref_iv, ref_lab, est_iv, est_lab))
    # adversarial: the estimate ends exactly where the reference starts, and an estimate entirely before it
    cases.append((np.array([[2.0, 4.0], [4.0, 6.0]]), ["C:maj", "N"], np.array([[0.0, 2.0], [2.0, 5.0]]), ["X", "C"]))
    cases.append((np.array([[2.0, 4.0]]), ["C:maj"], np.array([[0.0, 1.0]]), ["C"]))
    util = need("mir_eval.util")
    n_evaluate = 0
    for i, (ref_iv, ref_lab, est_iv, est_lab) in enumerate(cases):
        got = mm.chord_scores(ref_iv, ref_lab, est_iv, est_lab)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the pipeline of mir_eval.chord's docstrings: adjust, merge, durations, compare, weighted_accuracy
            e_iv, e_lab = util.adjust_intervals(est_iv, list(est_lab), ref_iv.min(), ref_iv.max(), "N", "N")
            iv, r, e = util.merge_labeled_intervals(ref_iv, list(ref_lab), e_iv, e_lab)
            dur = util.intervals_to_durations(iv)
            for level in mm.CHORD_LEVELS:
                want = chord.weighted_accuracy(getattr(chord, level)(r, e), dur)
                assert mm.ratio(*got[level]) == pytest.approx(want, abs=1e-12), (i, level)
            try:  # evaluate() runs the same pipeline, but fails where cropping leaves an empty estimate segment
                want = chord.evaluate(ref_iv, list(ref_lab), est_iv, list(est_lab))
            except ValueError:
                continue
        n_evaluate += 1
        for level in mm.CHORD_LEVELS:
            assert mm.ratio(*got[level]) == pytest.approx(want[level], abs=1e-12), (i, level)
    assert n_evaluate >= 30


def test_beat_and_onset_f_measure_match_mir_eval_with_overlapping_windows():
    beat, onset = need("mir_eval.beat"), need("mir_eval.onset")
    g = np.random.default_rng(3)
    cases = [  # a nearest-first greedy matcher gets these wrong: only a maximum matching finds 2 and 3 pairs
        (np.array([0.0, 0.1]), np.array([0.06, 0.16])),
        (np.array([1.0, 1.05, 1.1]), np.array([0.96, 1.03, 1.16])),
        (np.array([1.07, 2.0]), np.array([1.0, 2.07])),  # exactly 70 ms apart: mir_eval's float rule decides
        (np.array([0.3, 0.65]), np.array([0.25, 0.7])),  # exactly 50 ms
        (np.array([]), np.array([1.0])), (np.array([1.0]), np.array([])),
    ]
    for case in range(40):
        ref = np.cumsum(g.uniform(0.03, 0.6, g.integers(1, 60)))
        est = ref + g.normal(0, [0.01, 0.04, 0.08][case % 3], len(ref))
        est = np.concatenate([est[g.random(len(est)) > 0.2], g.uniform(0, ref.max() + 1, g.integers(0, 10))])
        if case % 4 == 0:  # events on a 10 ms grid: many distances exactly equal to the window
            ref, est = np.round(ref, 2), np.round(est, 2)
        cases.append((np.unique(ref), np.unique(np.abs(est))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, (ref, est) in enumerate(cases):
            assert mm.event_f_measure(ref, est, 0.07)[0] == pytest.approx(beat.f_measure(ref, est), abs=1e-12), i
            assert mm.event_f_measure(ref, est, 0.07, min_time=5.0)[0] == pytest.approx(
                beat.f_measure(beat.trim_beats(ref), beat.trim_beats(est)), abs=1e-12), i
            assert mm.event_f_measure(ref, est, 0.05) == pytest.approx(onset.f_measure(ref, est), abs=1e-12), i


def test_note_onset_f_measure_matches_mir_eval_transcription():
    tr = need("mir_eval.transcription")
    g = np.random.default_rng(4)
    cases = [  # the same onsets, pitches a semitone apart: onset_f counts them, note_f must pair them right
        (np.array([[1.0, 1.5], [1.02, 1.4]]), np.array([440.0, 466.16]),
         np.array([[1.04, 1.2], [0.99, 1.3]]), np.array([440.0, 466.16])),
        (np.array([[1.0, 2.0]]), np.array([440.0]), np.array([[1.05, 2.0]]), np.array([440.0 * 2 ** (50 / 1200)])),
    ]
    for case in range(40):
        n = int(g.integers(1, 30))
        on = np.sort(g.uniform(0, 10, n))
        if case % 3 == 0:
            on = np.round(on, 2)  # onsets on a 10 ms grid: distances of exactly 50 ms
        ref_iv = np.stack([on, on + g.uniform(0.05, 1, n)], 1)
        ref_hz = mm.midi_to_hz(g.integers(40, 80, n))
        keep = g.random(n) > 0.2
        est_on = on[keep] + (np.round(g.normal(0, 0.03, keep.sum()), 2) if case % 3 == 0 else g.normal(0, 0.03, keep.sum()))
        est_hz = ref_hz[keep] * 2 ** (g.choice([0, 0, 0, 1, -12, 0.4], keep.sum()) / 12)
        extra = int(g.integers(0, 6))
        est_on = np.abs(np.r_[est_on, g.uniform(0, 10, extra)])
        est_hz = np.r_[est_hz, mm.midi_to_hz(g.integers(40, 80, extra))]
        cases.append((ref_iv, ref_hz, np.stack([est_on, est_on + 0.1], 1), est_hz))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, (ref_iv, ref_hz, est_iv, est_hz) in enumerate(cases):
            got = mm.note_scores(ref_iv, ref_hz, est_iv, est_hz)
            p, r, f = tr.onset_precision_recall_f1(ref_iv, est_iv)
            assert (got["onset_p"], got["onset_r"], got["onset_f"]) == pytest.approx((p, r, f), abs=1e-12), i
            p, r, f, _ = tr.precision_recall_f1_overlap(ref_iv, ref_hz, est_iv, est_hz, offset_ratio=None)
            assert (got["note_p"], got["note_r"], got["note_f"]) == pytest.approx((p, r, f), abs=1e-12), i


def test_labels_at_frame_times_match_mir_eval_interpolation():
    util = need("mir_eval.util")
    g = np.random.default_rng(5)
    for case in range(25):
        iv, labels = random_segments(g, lambda g: str(g.integers(5)), gaps=case % 2 == 0)
        times = (320 * np.arange(int(iv.max() * 75) + 40) + 200) / 24000  # MERT frame centres, beyond the end too
        if case % 5 == 0:
            times = np.round(times * 4) / 4  # times exactly on segment boundaries
        assert mm.labels_at(iv, labels, times, "none") == util.interpolate_intervals(iv, labels, times, "none")
    assert mm.frame_accuracy(["a", None, "b", "b"], ["a", "a", "c", "b"]) == (2, 3)


def test_annotation_readers_name_file_and_line(tmp_path):
    lab = tmp_path / "song.lab"
    lab.write_text("0.0 1.5 C:maj\n1.5 3.0 A:min7/5\n\n# comment\n3.0 4.0 N\n")
    iv, labels = mm.read_segments(lab, chords=True)
    assert labels == ["C:maj", "A:min7/5", "N"] and iv.tolist() == [[0, 1.5], [1.5, 3], [3, 4]]
    (tmp_path / "key.lab").write_text("0 10 E minor\n")
    assert mm.read_segments(tmp_path / "key.lab")[1] == ["E minor"]  # section and key labels may hold spaces
    lab.write_text("0.0 1.5 C:maj\n1.5 3.0 C:mjr\n")
    with pytest.raises(mm.AnnotationError, match=r"song.lab: line 2: chord label 'C:mjr'"):
        mm.read_segments(lab, chords=True)
    lab.write_text("0.0 1.5 C\n2.0 1.9 D\n")
    with pytest.raises(mm.AnnotationError, match=r"song.lab: line 2: the segment ends"):
        mm.read_segments(lab)
    beats = tmp_path / "b.txt"
    beats.write_text("0.5 1\n1.0 2\n0.25 4\n")
    t, pos = mm.read_beats(beats)
    assert t.tolist() == [0.25, 0.5, 1.0] and pos.tolist() == [4, 1, 2]
    beats.write_text("0.5\n1.0\n")
    assert mm.read_beats(beats)[1] is None
    beats.write_text("0.5 1\n1.0 x\n")
    with pytest.raises(mm.AnnotationError, match=r"b.txt: line 2: beat-in-bar 'x'"):
        mm.read_beats(beats)
    notes = tmp_path / "n.txt"
    notes.write_text("OnsetTime\tOffsetTime\tMidiPitch\n0.1 0.5 69\n0.5 0.9 60\n")  # MAPS, with its header
    assert mm.read_notes(notes, "midi")[1] == pytest.approx([440.0, 261.6256], abs=1e-3)
    notes.write_text("0.1 0.5 -3\n")
    with pytest.raises(mm.AnnotationError, match=r"n.txt: line 1: need onset < offset and a pitch > 0"):
        mm.read_notes(notes)
    with pytest.raises(mm.AnnotationError, match="absent.lab: cannot read"):
        mm.read_segments(tmp_path / "absent.lab")


def test_roc_auc_and_average_precision_by_hand():
    y = np.array([1, 0, 1, 0])
    s = np.array([0.9, 0.8, 0.7, 0.1])
    assert mm.roc_auc(y, s) == pytest.approx(3 / 4)  # positive-negative pairs ranked right: 3 of 4
    assert mm.average_precision(y, s) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert mm.roc_auc(np.array([1, 0]), np.array([0.5, 0.5])) == 0.5  # a tie counts half
    # tied scores form one threshold: precision 2/3 at recall 1 for the block of three
    assert mm.average_precision(np.array([1, 0, 1]), np.array([0.5, 0.5, 0.5])) == pytest.approx(2 / 3)
    assert np.isnan(mm.roc_auc(np.ones(3), np.arange(3.0)))


def test_best_threshold_picks_the_best_score_and_the_lowest_among_equals():
    score = {0.1: 0.5, 0.2: 0.8, 0.3: 0.8, 0.4: 0.1}
    th, scores = mm.best_threshold(lambda t: {"f": score[t], "t": t}, "f", thresholds=[0.1, 0.2, 0.3, 0.4])
    assert th == 0.2 and scores == {"f": 0.8, "t": 0.2}
