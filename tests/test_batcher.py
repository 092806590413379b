"""The dynamic batcher on its own, with stand-in models: what a batch computes, what it skips, and the crop
poses it carries to the model."""
import asyncio
import threading

import numpy as np
import pytest
import torch

from posefix.batcher import BatcherStopped, DeadlineExpired, DynamicBatcher
from posefix.images import decode

from .conftest import IMAGE_785, TIMEOUT


def test_the_batcher_skips_expired_and_cancelled_calls_and_fails_queued_ones_on_stop():
    calls, gate = [], threading.Event()

    def refine(images, image_index, poses):
        calls.append(len(poses))
        assert gate.wait(TIMEOUT)
        return poses[..., :2] + 1, np.ones(poses.shape[:2])

    async def scenario():
        batcher = DynamicBatcher(refine, max_batch_size=4, max_queue_delay_ms=0, max_queue_size=64)
        await batcher.start()
        image = torch.zeros((3, 8, 8), dtype=torch.uint8)

        def pose(n):
            return np.ones((n, 17, 3))

        busy = asyncio.ensure_future(batcher.refine(image, pose(1)))
        while not calls:
            await asyncio.sleep(0.001)
        expiring = asyncio.ensure_future(batcher.refine(image, pose(1), timeout=0.01))
        cancelled = asyncio.ensure_future(batcher.refine(image, pose(2)))
        large = asyncio.ensure_future(batcher.refine(image, pose(9)))  # more than a batch: a batch of its own
        await asyncio.sleep(0.05)
        cancelled.cancel()
        gate.set()
        xy, conf = await busy
        assert xy.shape == (1, 17, 2) and conf.shape == (1, 17)
        with pytest.raises(DeadlineExpired):
            await expiring
        assert (await large)[0].shape == (9, 17, 2)
        gate.clear()
        computing = asyncio.ensure_future(batcher.refine(image, pose(3)))
        queued = asyncio.ensure_future(batcher.refine(image, pose(3)))
        while len(calls) < 3:
            await asyncio.sleep(0.001)
        stopping = asyncio.ensure_future(batcher.stop())
        await asyncio.sleep(0.01)
        gate.set()
        await stopping
        for call in (computing, queued):
            with pytest.raises(BatcherStopped):
                await call
        return batcher.stats

    stats = asyncio.run(asyncio.wait_for(scenario(), TIMEOUT))
    assert calls == [1, 9, 3]  # neither the expired nor the cancelled call was computed, nor the one queued at stop
    assert (stats.expired, stats.cancelled) == (1, 1)


def test_crop_poses_reach_the_model_and_calls_without_them_are_as_before():
    """A batch whose calls have no crop poses calls the model with three arguments, as always; a batch with a
    call that has them passes a fourth: each call's crop poses, its own poses for a call without."""
    seen, started, gate = [], threading.Event(), threading.Event()

    def refine(images, image_index, poses, *crop):
        started.set()
        assert gate.wait(TIMEOUT)
        seen.append((poses.copy(), [c.copy() for c in crop]))
        return poses[..., :2] + 1, np.ones(poses.shape[:2])

    def pose(n, value):
        return np.full((n, 17, 3), float(value))

    async def scenario():
        batcher = DynamicBatcher(refine, max_batch_size=8, max_queue_delay_ms=0, max_queue_size=64)
        await batcher.start()
        image = torch.zeros((3, 8, 8), dtype=torch.uint8)
        first = asyncio.ensure_future(batcher.refine(image, pose(1, 1)))  # a batch of its own, held by the gate
        while not started.is_set():
            await asyncio.sleep(0.001)
        plain = asyncio.ensure_future(batcher.refine(image, pose(2, 2)))
        cropped = asyncio.ensure_future(batcher.refine(image, pose(3, 3), crop_poses=pose(3, 30)))
        while batcher.queued_persons < 5:
            await asyncio.sleep(0.001)
        gate.set()
        out = await asyncio.gather(first, plain, cropped)
        with pytest.raises(ValueError, match="crop_poses"):
            await batcher.refine(image, pose(2, 2), crop_poses=pose(1, 2))
        await batcher.stop()
        return out

    out = asyncio.run(asyncio.wait_for(scenario(), TIMEOUT))
    assert [len(p) for p, _ in seen] == [1, 5]
    assert seen[0][1] == []  # no crop poses: called as refine(images, image_index, poses)
    (crops,) = seen[1][1]
    np.testing.assert_array_equal(crops, np.concatenate([pose(2, 2), pose(3, 30)]))
    np.testing.assert_array_equal(out[2][0], pose(3, 3)[..., :2] + 1)  # each call gets its own persons back


def test_a_refiner_through_the_batcher_crops_where_it_is_told(refiner, poses_785):
    """The batcher's result with crop poses is the refiner's with the same crop poses, not its result around
    the poses themselves."""
    image = decode(IMAGE_785)
    poses = poses_785[:3]
    crops = poses.copy()
    crops[..., :2] += 15.0

    async def scenario():
        batcher = DynamicBatcher(refiner.refine, max_batch_size=8, max_queue_delay_ms=20, max_queue_size=64)
        await batcher.start()
        out = await asyncio.gather(batcher.refine(image, poses[:2], crop_poses=crops[:2]),
                                   batcher.refine(image, poses[2:]))
        await batcher.stop()
        return out, batcher.stats

    (a, b), stats = asyncio.run(asyncio.wait_for(scenario(), TIMEOUT))
    assert stats.batches == 1  # both calls in one batch: one cropped, one not
    index = np.zeros(3, dtype=np.int64)
    want_xy, want_conf = refiner.refine([image], index, poses, crop_poses=np.concatenate([crops[:2], poses[2:]]))
    np.testing.assert_allclose(np.concatenate([a[0], b[0]]), want_xy, atol=1e-4)
    np.testing.assert_allclose(np.concatenate([a[1], b[1]]), want_conf, atol=1e-5)
    around_own, _ = refiner.refine([image], index, poses)
    assert np.abs(a[0] - around_own[:2]).max() > 0.1  # the crop poses changed the refinement
