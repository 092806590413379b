"""The fast JSON reader and annotation checks against the plain ones."""
import json

import numpy as np

from synth.cocoio import _ground_truth, read_json
from synth.exceptions import InputError

from .conftest import VAL_GT


def test_json_reader_gives_the_standard_librarys_values(tmp_path):
    """The fast reader parses as json does, and what it refuses (NaN, a BOM) still parses the same way."""
    assert read_json(VAL_GT, "annotations") == json.loads(VAL_GT.read_bytes())
    odd = tmp_path / "odd.json"
    odd.write_bytes(b'\xef\xbb\xbf{"a": [NaN, 1e400, 18446744073709551615, -0.0, 0.1]}')
    got = read_json(odd, "x")["a"]
    assert np.isnan(got[0]) and got[1:] == [float("inf"), 18446744073709551615, -0.0, 0.1]


def test_annotations_checked_in_bulk_as_entry_by_entry():
    """Well-formed annotations give the entry-by-entry arrays; a malformed one falls back to those checks,
    which name it."""
    doc = json.loads(VAL_GT.read_bytes())
    fast, plain = _ground_truth(doc, "gt"), _ground_truth(doc, "gt", bulk=False)
    for field in ("ids", "image_ids", "keypoints", "areas", "boxes", "crowd"):
        assert np.array_equal(getattr(fast, field), getattr(plain, field)) and getattr(fast, field).dtype == \
            getattr(plain, field).dtype, field
    rng = np.random.default_rng(0)
    errors = 0
    breaks = [("keypoints", 5, float("nan")), ("keypoints", 2, -1), ("keypoints", 0, True), ("keypoints", 7, "3"),
              ("bbox", 2, -1.0), ("bbox", 0, None), ("area", None, -2.0), ("area", None, True), ("id", None, 1.5),
              ("image_id", None, 999999999), ("iscrowd", None, 0)]
    for key, at, value in breaks:
        bad = json.loads(VAL_GT.read_bytes())
        i = int(rng.integers(len(bad["annotations"])))
        a = bad["annotations"][i]
        if at is None:
            a[key] = value
        else:
            a[key][at] = value
        outcomes = []
        for use_bulk in (True, False):
            try:
                outcomes.append(_ground_truth(bad, "gt", bulk=use_bulk).keypoints.tolist())
            except InputError as e:
                outcomes.append(str(e))
        assert outcomes[0] == outcomes[1], (key, at, value)
        errors += isinstance(outcomes[0], str)
    assert errors == len(breaks) - 1  # all but the harmless iscrowd 0
    del bad["annotations"][3]["area"]  # the box's area stands in
    assert np.array_equal(_ground_truth(bad, "gt").areas, _ground_truth(bad, "gt", bulk=False).areas)
