"""DALI loader's GPU readiness, checked in CPU-only mode where possible: the 'mixed' decoder's sizing arguments exist in
this DALI, the val pipeline is built once per loader, a train pipeline closes as soon as its epoch stops, epoch 0's
JPEG headers are read by a thread pool, and the calls that put outputs on torch's stream exist. The CUDA tests check
the same paths on a GPU (batches on the device, no host synchronisation)."""

import inspect
import threading
import time

import pytest
import torch
from test_data_helpers import write_noise_split

from res2net.data import DataConfig, build_loader, loader_dali

dali_backend = pytest.importorskip("nvidia.dali.backend")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dali_ready")
    write_noise_split(root, "train", 40, seed=3)
    write_noise_split(root, "val", 29, seed=4)
    return root


def cfg_for(root, **kw):
    return DataConfig(**{"root": str(root), "backend": "dali", "batch_size": 8, "img_size": 32, "num_workers": 1, **kw})


def cuda_only(test):
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def test_mixed_decoder_sizing_arguments_exist_in_this_dali():
    """NVIDIA's ResNet-50 example values, and every name is an argument of the decoders the graph uses."""
    args = loader_dali.MIXED_DECODER_ARGS
    assert args == dict(
        device_memory_padding=211025920,
        host_memory_padding=140544512,
        preallocate_width_hint=5980,
        preallocate_height_hint=6430,
        hw_decoder_load=0.65,
    )
    for op in ("decoders__Image", "decoders__ImageSlice"):
        assert set(args) <= set(dali_backend.GetSchema(op).GetArgumentNames()), op


def test_outputs_on_a_stream_api_of_this_dali():
    """pipe.run(stream) (positional) and feed_ndarray(..., cuda_stream=) are what _run / _to_torch call."""
    from nvidia.dali import Pipeline
    from nvidia.dali.plugin.pytorch import feed_ndarray

    first = list(inspect.signature(Pipeline.run).parameters.values())[1]
    assert first.name == "cuda_stream" and first.kind is inspect.Parameter.POSITIONAL_ONLY
    assert "cuda_stream" in inspect.signature(feed_ndarray).parameters
    # Asynchronous outputs need DALI's dynamic executor, the default of a pipeline built as the loader builds it.
    assert Pipeline(batch_size=1, num_threads=1, device_id=None)._exec_dynamic


def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


def test_val_pipeline_is_built_once_and_reused_across_epochs(root):
    loader = build_loader(cfg_for(root), "val")
    try:
        first = batches(loader)
        pipe = loader._pipe
        assert pipe is not None and len(first) == 4  # ceil(29 / 8): the last batch padded by the reader, trimmed
        assert sum(len(y) for _, y in first) == 29
        for epoch in (1, 2, 3):
            loader.set_epoch(epoch)
            assert same(batches(loader), first)  # its next pass starts again at the first file
            assert loader._pipe is pipe
    finally:
        loader.close()
    assert loader._pipe is None and pipe._pipe is None  # shut down, not left to the garbage collector


def test_val_pipeline_rebuilt_after_a_partial_pass_or_for_another_start(root):
    loader = build_loader(cfg_for(root), "val")
    try:
        full = batches(loader)
        pipe = loader._pipe
        next(iter(loader))  # one batch, then the iterator is dropped: the pipeline stands mid-pass
        assert same(batches(loader), full) and loader._pipe is not pipe and pipe._pipe is None
        loader.set_epoch(0, start_batch=2)
        assert same(batches(loader), full[2:])
        tail = loader._pipe
        loader.set_epoch(0, start_batch=2)
        assert same(batches(loader), full[2:]) and loader._pipe is tail  # the same start again: reused
        assert same(batches(loader), full) and loader._pipe is not tail and tail._pipe is None
    finally:
        loader.close()


def test_train_pipeline_closes_when_its_epoch_stops_or_ends(root):
    loader = build_loader(cfg_for(root), "train", seed=1)
    try:
        reference = batches(loader)
        assert loader._pipe is None  # a whole epoch: closed at its end
        epoch = iter(loader)
        next(epoch)
        pipe = loader._pipe
        del epoch  # train_one_epoch returning on a stop drops its iterator mid-epoch
        assert loader._pipe is None and pipe._pipe is None
        suspended = iter(loader)
        next(suspended)  # still referenced: the next iteration closes it before building its own
        pipe = loader._pipe
        loader.set_epoch(0)
        assert same(batches(loader), reference) and pipe._pipe is None
        del suspended
    finally:
        loader.close()


def test_epoch_0_headers_are_read_by_a_thread_pool_once(root, monkeypatch):
    reference = build_loader(cfg_for(root), "train", seed=2)
    expected = batches(reference)
    reference.close()
    threads, calls, read = set(), [], loader_dali.jpeg_size

    def slow_jpeg_size(path, *opener):
        threads.add(threading.get_ident())
        calls.append(path)
        time.sleep(0.005)  # a cold disk: the pool overlaps these waits
        return read(path, *opener)

    monkeypatch.setattr(loader_dali, "jpeg_size", slow_jpeg_size)
    loader = build_loader(cfg_for(root), "train", seed=2)
    try:
        assert same(batches(loader), expected)
        assert len(calls) == 40 and len(set(calls)) == 40  # each header once (the epoch wraps around: cached)
        assert len(threads) > 1 and threading.get_ident() not in threads
        loader.set_epoch(1)
        batches(loader)
        assert len(calls) == 40  # later epochs read no header
    finally:
        loader.close()
    assert loader._header_pool is None


def test_cpu_consumer_gets_unpinned_host_batches(root):
    """Pinning is for a CUDA consumer only (pin_memory needs CUDA); on the CPU the batch stays as it is."""
    loader = build_loader(cfg_for(root), "val")
    try:
        x, y = next(iter(loader))
        assert x.device.type == "cpu" and not y.is_pinned()
        assert loader._pinned(y) is y
    finally:
        loader.close()


@cuda_only
def test_cpu_decoding_for_a_cuda_consumer_pins_and_syncs_nothing(root):
    cuda = torch.device("cuda")
    for resize in ("torch", "graph"):
        loader = build_loader(cfg_for(root, dali_decoder="cpu", dali_resize=resize), "val", device=cuda)
        try:
            cpu = batches(build_loader(cfg_for(root, dali_resize=resize), "val"))
            assert loader._pinned(torch.zeros(2)).is_pinned()
            next(iter(loader))  # warm: the pinned-memory pool and CUDA context exist
            torch.cuda.set_sync_debug_mode("error")
            try:
                got = batches(loader)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert all(x.device.type == "cuda" and y.device.type == "cuda" for x, y in got)
            assert len(got) == len(cpu)
            for (x, y), (u, v) in zip(got, cpu):  # normalized on the GPU instead: the same float32 operations
                assert torch.equal(y.cpu(), v) and torch.allclose(x.cpu(), u, atol=1e-6)
        finally:
            loader.close()


@cuda_only
def test_mixed_decoding_yields_on_the_current_stream_without_host_sync(root):
    cuda = torch.device("cuda")
    for split in ("val", "train"):
        loader = build_loader(cfg_for(root, img_size=64), split, device=cuda, channels_last=True, dtype=torch.bfloat16)
        try:
            assert loader.decoder == "mixed"
            next(iter(loader))  # warm-up: nvJPEG and the pipeline's buffers are allocated here
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                loader.set_epoch(1)
                torch.cuda.set_sync_debug_mode("error")
                try:
                    got = [(x.float().sum(), y.sum()) for x, y in loader]  # consumed on the side stream
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            stream.synchronize()
            assert len(got) == len(loader) and all(torch.isfinite(s) for s, _ in got)
        finally:
            loader.close()
