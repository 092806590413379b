"""``posefix refine-video`` without a checkpoint or video: temporal refinement of an estimator's file."""
from __future__ import annotations

import json

import numpy as np
import pytest

from posefix.cli import main
from posefix.temporal import TemporalOptions, make_smoother, refine_poses


def _walk(rng, frames=30, offset=(200.0, 150.0)):
    base = rng.uniform(-50, 50, (17, 2)) + offset
    path = base + np.arange(frames)[:, None, None] * [3.0, 0.5]
    return path + rng.normal(0, 2.0, path.shape)


def _results(persons, image_id=lambda f: f, with_ids=True):
    out = []
    for tid, xy in persons.items():
        for f, pose in enumerate(xy):
            kp = np.concatenate([pose, np.full((17, 1), 0.7)], -1)
            r = {"image_id": image_id(f), "category_id": 1, "keypoints": kp.reshape(-1).round(3).tolist(),
                 "score": 0.7}
            if with_ids:
                r["track_id"] = tid
            out.append(r)
    return out


def test_temporal_refinement_of_a_coco_file_offline_and_causal(tmp_path, capsys):
    rng = np.random.default_rng(0)
    a = _walk(rng)
    a[:, 9], a[:, 10] = a[:, 5] + [-40, 60], a[:, 6] + [40, 60]  # the wrists well apart
    a[12:15, [9, 10]] = a[12:15, [10, 9]]  # a left/right flip of the wrists
    given = _results({7: a, 9: _walk(rng, offset=(500.0, 300.0))})
    inp = tmp_path / "poses.json"
    inp.write_text(json.dumps(given))
    kp = np.array([r["keypoints"] for r in given]).reshape(-1, 17, 3)
    frame = np.array([r["image_id"] for r in given])
    track = np.array([r["track_id"] for r in given])
    for causal in (False, True):
        out = tmp_path / f"out{causal}.json"
        assert main(["refine-video", "--input", str(inp), "--out", str(out)] + (["--causal"] if causal else [])) == 0
        res = json.loads(out.read_text())
        assert [r["image_id"] for r in res] == frame.tolist()
        assert [r["track_id"] for r in res] == track.tolist()
        lib = refine_poses(kp, make_smoother("body"), frame=frame, track=track, causal=causal)
        np.testing.assert_allclose(np.array([r["keypoints"] for r in res]).reshape(-1, 17, 3)[..., :2], lib.xy)
        labels = np.array([r["keypoint_temporal"] for r in res])
        assert (labels[12:15, 9] == "corrected").all() and (labels[12:15, 10] == "corrected").all()
        assert set(labels.ravel()) <= {"smoothed", "corrected", "filled", "absent"}
    assert "refined 60 persons in 2 tracks" in capsys.readouterr().out


def test_many_videos_with_annotations_and_tracks_assigned(tmp_path):
    rng = np.random.default_rng(1)
    images = [{"id": 100 * v + f, "vid_id": v, "frame_id": f, "width": 640, "height": 480}
              for v in (1, 2) for f in range(20)]
    (tmp_path / "frames.json").write_text(json.dumps({"images": images}))
    given = []
    for v in (1, 2):
        given += _results({0: _walk(rng, 20), 1: _walk(rng, 20, offset=(450.0, 300.0))},
                          image_id=lambda f, v=v: 100 * v + f, with_ids=False)
    (tmp_path / "poses.json").write_text(json.dumps(given))
    assert main(["refine-video", "--input", str(tmp_path / "poses.json"), "--out", str(tmp_path / "out.json"),
                 "--annotations", str(tmp_path / "frames.json")]) == 0
    res = json.loads((tmp_path / "out.json").read_text())
    assert [r["image_id"] for r in res] == [r["image_id"] for r in given]
    ids = np.array([r["track_id"] for r in res]).reshape(4, 20)  # (video, person) × frames
    assert all(len(set(row)) == 1 for row in ids)  # one id per person throughout
    assert ids[0, 0] != ids[1, 0] and ids[2, 0] != ids[3, 0]


def test_a_missing_person_is_filled_in_and_marked(tmp_path):
    rng = np.random.default_rng(2)
    given = [r for r in _results({3: _walk(rng, 20)}) if not 8 <= r["image_id"] < 11]
    (tmp_path / "poses.json").write_text(json.dumps(given))
    assert main(["refine-video", "--input", str(tmp_path / "poses.json"), "--out", str(tmp_path / "out.json"),
                 "--max-person-gap", "3"]) == 0
    res = json.loads((tmp_path / "out.json").read_text())
    added = res[len(given):]
    assert [r["image_id"] for r in added] == [8, 9, 10]
    assert all(r["filled_person"] and r["track_id"] == 3 and set(r["keypoint_temporal"]) == {"filled"} for r in added)


def test_the_lost_frame_gate_takes_out_a_frame_where_the_estimator_lost_the_person(tmp_path):
    rng = np.random.default_rng(4)
    a = _walk(rng, 30)
    given = _results({5: a})
    lost = 15  # the estimator jumps away with a low score for one frame, as when it loses the person
    jumped = np.concatenate([a[lost] + [160.0, -90.0], np.full((17, 1), 0.2)], -1)
    given[lost]["keypoints"] = jumped.reshape(-1).tolist()
    inp = tmp_path / "poses.json"
    inp.write_text(json.dumps(given))
    kp = np.array([r["keypoints"] for r in given]).reshape(-1, 17, 3)
    frame = np.arange(30)
    track = np.full(30, 5)
    outputs = {}
    for gate in ([], ["--person-gate", "0.3", "--lost-score", "0.5"]):
        out = tmp_path / f"out{len(gate)}.json"
        assert main(["refine-video", "--input", str(inp), "--out", str(out), *gate]) == 0
        outputs[len(gate)] = res = json.loads(out.read_text())
        options = TemporalOptions(person_gate=0.3, lost_score=0.5) if gate else TemporalOptions()
        lib = refine_poses(kp, make_smoother("body"), frame=frame, track=track, options=options)
        np.testing.assert_allclose(np.array([r["keypoints"] for r in res]).reshape(-1, 17, 3)[..., :2], lib.xy)
    gated = np.array(outputs[4][lost]["keypoints"]).reshape(17, 3)[:, :2]
    plain = np.array(outputs[0][lost]["keypoints"]).reshape(17, 3)[:, :2]
    # filled in from the frames around it: on the person's course, where the ungated output followed the jump
    assert np.abs(gated - a[lost]).max() < 10 < np.abs(plain - a[lost]).min()
    assert set(outputs[4][lost]["keypoint_temporal"]) == {"corrected"} != set(outputs[0][lost]["keypoint_temporal"])


@pytest.mark.parametrize("args,doc,message", [
    (["--max-gap", "-1"], None, "--max-gap: must be in [0, 300]"),
    (["--person-gate", "-1"], None, "--person-gate: must be in [0, 100]"),
    (["--lost-score", "2"], None, "--lost-score: must be in [0, 1]"),
    (["--person-gate", "0.3", "--causal"], None, "--person-gate: works offline only, not causal"),
    (["--checkpoint", "model.safetensors"], None, "--checkpoint: needs --video"),
    ([], [{"image_id": 0, "category_id": 1, "keypoints": [1.0] * 50, "score": 1}], "keypoints"),
    ([], [{"image_id": 0, "category_id": 1, "keypoints": [1.0] * 51, "score": 1, "track_id": -3}], "track_id"),
    (["--annotations", "FRAMES"], [{"image_id": 5, "category_id": 1, "keypoints": [1.0] * 51, "score": 1}],
     "poses[0].image_id: 5 is not an image of the annotations"),
])
def test_bad_input_is_a_one_line_error_naming_the_field(tmp_path, capsys, args, doc, message):
    inp = tmp_path / "poses.json"
    inp.write_text(json.dumps(doc if doc is not None else _results({1: _walk(np.random.default_rng(3), 5)})))
    (tmp_path / "frames.json").write_text(json.dumps({"images": [{"id": 1, "vid_id": 0, "frame_id": 0}]}))
    args = [str(tmp_path / "frames.json") if a == "FRAMES" else a for a in args]
    out = tmp_path / "out.json"
    assert main(["refine-video", "--input", str(inp), "--out", str(out)] + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("posefix: error:") and message in err and "\n" not in err
    assert not out.exists()


def test_a_movenet_file_with_the_frame_size(tmp_path, capsys):
    rng = np.random.default_rng(4)
    xy = _walk(rng, 15)
    entries = [{"image": f, "track_id": 2, "keypoints": [[y / 480, x / 640, 0.6] for x, y in pose.tolist()]}
               for f, pose in enumerate(xy)]
    inp, out = tmp_path / "movenet.json", tmp_path / "out.json"
    inp.write_text(json.dumps(entries))
    assert main(["refine-video", "--input", str(inp), "--format", "movenet", "--out", str(out)]) == 2
    assert "entries[0].image: no size" in capsys.readouterr().err
    assert main(["refine-video", "--input", str(inp), "--format", "movenet", "--out", str(out),
                 "--frame-size", "640x480"]) == 0
    res = json.loads(out.read_text())
    kp = np.concatenate([xy, np.full((15, 17, 1), 0.6)], -1)
    want = refine_poses(kp, make_smoother("body"), frame=np.arange(15), track=np.full(15, 2))
    np.testing.assert_allclose(np.array([r["keypoints"] for r in res]).reshape(-1, 17, 3)[..., :2], want.xy,
                               atol=1e-6)
    assert [r["source_format"] for r in res] == ["movenet"] * 15
    # the format's own keypoints, normalised again
    np.testing.assert_allclose(np.array(res[3]["source_keypoints"])[:, 1] * 640, want.xy[3, :, 0], atol=1e-6)
    assert main(["refine-video", "--input", str(inp), "--format", "movenet", "--out", str(out),
                 "--frame-size", "640"]) == 2
    assert "--frame-size: must be WIDTHxHEIGHT" in capsys.readouterr().err
