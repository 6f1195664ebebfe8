"""The shard worker (:mod:`pipelines.worker`) in-process: the parallel encoders keep the tar byte-identical."""


R = 64


def test_parallel_encodes_keep_tar_bytes(tmp_path):
    """The worker's writer encodes on ``ray.encode_threads`` threads; the tar is byte-identical to one thread's."""
    from PIL import Image

    from cnc.config import load_config
    from cnc.tiny import synthetic_photo as photo
    from pipelines.worker import ShardWorker
    from triplets.builder import resolve_models
    from triplets.config import BuildConfig
    from triplets.readers import read_items

    src = tmp_path / "photos"
    src.mkdir()
    for i in range(3):
        Image.fromarray(photo(i, 80, 96)).save(src / f"p{i}.jpg", quality=92)
    cfg = load_config(BuildConfig, "configs/build/tiny.yaml", [
        f"resolution={R}", "min_side=32", "inpaint.num_inference_steps=1", "batch_size=2", "inpaint.batch_size=1",
        "quality.enabled=false", "ray.encode_threads=1"])
    worker = ShardWorker(cfg.model_dump(mode="json"), resolve_models(cfg), "test")
    assert [s.batch_size for s in worker.builder.model_stages] == [2, 1, 2, 2]
    spec = {"shard": 0, "name": "000000", "items": read_items(str(src))}
    one = worker.build_shard(spec, output=str(tmp_path / "one"))
    worker.cfg.ray.encode_threads = 4
    four = worker.build_shard(spec, output=str(tmp_path / "four"))
    assert one.nsamples == four.nsamples == 3
    assert (tmp_path / "one" / "000000.tar").read_bytes() == (tmp_path / "four" / "000000.tar").read_bytes()
