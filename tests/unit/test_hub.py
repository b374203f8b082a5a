"""musiclm_core.hub: resolving folders and hub ids, reading every weight-file layout safely, the native format."""

import json

import huggingface_hub.constants
import pytest
import safetensors.torch
import torch

from musiclm_core import hub
from musiclm_core.hub import CheckpointError


def tensors(seed: int = 0, prefix: str = "") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{prefix}a.weight": torch.randn(3, 4, generator=g), f"{prefix}a.bias": torch.randn(3, generator=g),
            f"{prefix}steps": torch.arange(5)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def write_index(folder, name: str, shards: dict[str, dict[str, torch.Tensor]]) -> None:
    weight_map = {key: shard for shard, part in shards.items() for key in part}
    (folder / name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


class Payload:
    """Unpickling this creates a marker file: what a malicious pickle would do with os.system instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


# ---------------------------------------------------------------------------------------------------------------
# resolve


def test_resolve_local_folder(tmp_path):
    assert hub.resolve(tmp_path) == tmp_path
    assert hub.resolve(str(tmp_path)) == tmp_path


def test_resolve_errors_for_paths(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is a file; pass the folder"):
        hub.resolve(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no such folder: .*missing"):
        hub.resolve(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no such folder"):
        hub.resolve("./not/a/folder")


def test_resolve_hub_id_offline_and_not_cached(tmp_path, monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE and the cache location when it is imported: set both ways.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError) as info:
        hub.resolve("someone/not-a-cached-repo")
    message = str(info.value)
    assert "'someone/not-a-cached-repo'" in message and "\n" not in message
    assert "pass the folder DIR instead of the hub id" in message
    # huggingface_hub 2.x installs only `hf`; HF_HUB_OFFLINE is already set, so it is not suggested again
    assert "`hf download someone/not-a-cached-repo --local-dir DIR`" in message and "huggingface-cli" not in message
    assert "HF_HUB_OFFLINE is set" in message and "set HF_HUB_OFFLINE=1" not in message


def test_resolve_hub_id_unreachable(monkeypatch):
    import huggingface_hub

    def unreachable(name, **kwargs):
        raise OSError("Name or service not known\nPlease check your internet connection")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(CheckpointError) as info:
        hub.resolve("someone/repo")
    message = str(info.value)
    assert message.startswith("could not get 'someone/repo' from the Hugging Face hub (OSError: Name or service "
                              "not known Please check your internet connection). Without network access, ")
    assert "`hf download someone/repo --local-dir DIR`" in message and "set HF_HUB_OFFLINE=1" in message
    # A name without "/" that is no folder: most likely a mistyped folder, but "t5-base" is a hub id too.
    with pytest.raises(CheckpointError, match=r"^no such folder: tiny_hfx \(and not a hub id: could not get "
                                              r"'tiny_hfx' .*\)\. Check the folder's name; for a hub repo, "):
        hub.resolve("tiny_hfx")
    for path_like in ("./tiny_hfx", "models/tiny/", "a/b/c", "~/nothing_here_x"):
        with pytest.raises(CheckpointError, match=r"^no such folder: [^(]*$"):
            hub.resolve(path_like)


# ---------------------------------------------------------------------------------------------------------------
# load_state_dict / load_tensors / weight_files


def test_single_safetensors(tmp_path):
    safetensors.torch.save_file(tensors(), tmp_path / "model.safetensors")
    assert hub.weight_files(tmp_path) == [tmp_path / "model.safetensors"]
    assert same(hub.load_state_dict(tmp_path), tensors())


def test_sharded_safetensors(tmp_path):
    shards = {"model-00001-of-00002.safetensors": tensors(0, "x."),
              "model-00002-of-00002.safetensors": tensors(1, "y.")}
    for name, part in shards.items():
        safetensors.torch.save_file(part, tmp_path / name)
    write_index(tmp_path, "model.safetensors.index.json", shards)
    assert same(hub.load_state_dict(tmp_path), {**tensors(0, "x."), **tensors(1, "y.")})
    # read into memory instead of mapped (a quantised load frees the weights it replaces): the same tensors,
    # each in a storage of its own
    read = hub.load_state_dict(tmp_path, mmap=False)
    assert same(read, {**tensors(0, "x."), **tensors(1, "y.")})
    assert len({t.untyped_storage().data_ptr() for t in read.values()}) == len(read)
    # only the keys asked for, across the shards, mapped or read
    for mmap in (True, False):
        picked = hub.load_state_dict(tmp_path, mmap=mmap, select=lambda key: key.endswith(".weight"))
        wanted = ("x.a.weight", "y.a.weight")
        assert picked.keys() == set(wanted) and same(picked, {k: read[k] for k in wanted})
    # a predicate maps the keys it accepts and reads the others, in one pass: the same values either way
    mixed = hub.load_state_dict(tmp_path, mmap=lambda key: key.startswith("x."))
    assert same(mixed, read)
    read_ptrs = {t.untyped_storage().data_ptr() for k, t in mixed.items() if k.startswith("y.")}
    assert len(read_ptrs) == len([k for k in mixed if k.startswith("y.")])  # each read tensor owns its storage


def test_single_bin(tmp_path):
    torch.save(tensors(), tmp_path / "pytorch_model.bin")
    assert same(hub.load_state_dict(tmp_path), tensors())
    picked = hub.load_state_dict(tmp_path, select=lambda key: key == "steps")
    assert same(picked, {"steps": tensors()["steps"]})


def test_sharded_bin(tmp_path):
    shards = {"pytorch_model-00001-of-00002.bin": tensors(0, "x."), "pytorch_model-00002-of-00002.bin": tensors(1, "y.")}
    for name, part in shards.items():
        torch.save(part, tmp_path / name)
    write_index(tmp_path, "pytorch_model.bin.index.json", shards)
    assert same(hub.load_state_dict(tmp_path), {**tensors(0, "x."), **tensors(1, "y.")})


def test_diffusers_component_folder(tmp_path):
    # unet/, vae/ of a diffusers pipeline: diffusion_pytorch_model.safetensors (and .bin, and variants).
    safetensors.torch.save_file(tensors(), tmp_path / "diffusion_pytorch_model.safetensors")
    assert same(hub.load_state_dict(tmp_path), tensors())
    half = {k: v.half() if v.is_floating_point() else v for k, v in tensors(1).items()}
    torch.save(half, tmp_path / "diffusion_pytorch_model.fp16.bin")
    assert same(hub.load_state_dict(tmp_path, variant="fp16"), half)


def test_variant_files_are_picked(tmp_path):
    # The stereo MusicGen repos: fp16 weights by default, fp32 under variant="fp32" (single and sharded).
    half = {k: v.half() if v.is_floating_point() else v for k, v in tensors().items()}
    safetensors.torch.save_file(half, tmp_path / "model.safetensors")
    safetensors.torch.save_file(tensors(), tmp_path / "model.fp32.safetensors")
    assert same(hub.load_state_dict(tmp_path), half)
    assert same(hub.load_state_dict(tmp_path, variant="fp32"), tensors())

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    safetensors.torch.save_file(half, sharded / "model.safetensors")
    shards = {"model.fp32-00001-of-00002.safetensors": tensors(0, "x."),
              "model.fp32-00002-of-00002.safetensors": tensors(1, "y.")}
    for name, part in shards.items():
        safetensors.torch.save_file(part, sharded / name)
    write_index(sharded, "model.safetensors.index.fp32.json", shards)
    assert same(hub.load_state_dict(sharded, variant="fp32"), {**tensors(0, "x."), **tensors(1, "y.")})


def test_safetensors_preferred_over_bin(tmp_path):
    safetensors.torch.save_file(tensors(0), tmp_path / "model.safetensors")
    torch.save(tensors(1), tmp_path / "pytorch_model.bin")
    assert hub.weight_files(tmp_path) == [tmp_path / "model.safetensors"]


def test_no_weight_file_lists_what_is_there(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "weights.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no weight file in .*model\.safetensors.*found \['config\.json', "
                                              r"'weights\.pt'\]"):
        hub.load_state_dict(tmp_path)
    with pytest.raises(CheckpointError, match=r"model\.fp32\.safetensors"):
        hub.load_state_dict(tmp_path, variant="fp32")


def test_corrupt_files_are_named(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        hub.load_state_dict(tmp_path)

    good = tmp_path / "good.safetensors"
    safetensors.torch.save_file(tensors(), good)
    (tmp_path / "truncated.safetensors").write_bytes(good.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"truncated\.safetensors is not a readable safetensors file"):
        hub.load_tensors(tmp_path / "truncated.safetensors")

    (tmp_path / "pytorch_model.bin").write_bytes(b"this is not a pickle")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin could not be read as a weights-only"):
        hub.load_tensors(tmp_path / "pytorch_model.bin")

    with pytest.raises(CheckpointError, match=r"missing weight file .*absent\.bin"):
        hub.load_tensors(tmp_path / "absent.bin")


def test_pickle_with_arbitrary_objects_is_refused(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"a.weight": torch.zeros(2), "payload": Payload(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin could not be read as a weights-only"):
        hub.load_state_dict(tmp_path)
    assert not marker.exists()  # the payload never ran


def test_bin_that_is_not_a_dict(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin holds a Tensor, expected a dict of tensors"):
        hub.load_state_dict(tmp_path)


def test_index_errors(tmp_path):
    shards = {"model-00001-of-00002.safetensors": tensors(0, "x."),
              "model-00002-of-00002.safetensors": tensors(1, "y.")}
    safetensors.torch.save_file(shards["model-00001-of-00002.safetensors"], tmp_path / "model-00001-of-00002.safetensors")
    write_index(tmp_path, "model.safetensors.index.json", shards)
    with pytest.raises(CheckpointError, match=r"names shard files that are not in .*\['model-00002-of-00002"):
        hub.load_state_dict(tmp_path)

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="has no 'weight_map' object"):
        hub.load_state_dict(tmp_path)

    (tmp_path / "model.safetensors.index.json").write_text("{broken")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json is not valid JSON"):
        hub.load_state_dict(tmp_path)


def test_key_in_two_shards(tmp_path):
    # The index maps "dup" to one shard only, but both files hold it: which copy wins would be arbitrary.
    shards = {"a.safetensors": {**tensors(0, "x."), "dup": torch.zeros(1)},
              "b.safetensors": {**tensors(1, "y."), "dup": torch.ones(1)}}
    for name, part in shards.items():
        safetensors.torch.save_file(part, tmp_path / name)
    write_index(tmp_path, "model.safetensors.index.json", shards)
    with pytest.raises(CheckpointError, match=r"keys present in more than one shard \(b\.safetensors\): \['dup'\]"):
        hub.load_state_dict(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# detect_layout


@pytest.mark.parametrize("files, layout", [
    ({"config.json": {"musiclm_core": {"model": "encodec", "version": 1}, "config": {}}}, "native"),
    ({"config.json": {"model_type": "musicgen"}}, "transformers"),
    ({"model_index.json": {"_class_name": "MusicLDMPipeline"}}, "diffusers"),
    ({"state_dict.bin": None}, "audiocraft"),
    ({"compression_state_dict.bin": None}, "audiocraft"),
])
def test_detect_layout(tmp_path, files, layout):
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content) if content is not None else "")
    assert hub.detect_layout(tmp_path) == layout


def test_detect_layout_unknown_lists_the_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))  # no model_type, no marker
    (tmp_path / "weights.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"unknown checkpoint layout .*found \['config\.json', 'weights\.ckpt'\]"):
        hub.detect_layout(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Native format


def test_native_round_trip(tmp_path):
    tied = torch.randn(4, 3)
    state = {**tensors(), "t.weight": torch.randn(3, 4).t(),  # not contiguous
             "emb.weight": tied, "head.weight": tied,  # tied weights share memory
             "half": torch.ones(2, dtype=torch.float16)}
    config = {"dim": 8, "names": ["a", "b"], "eps": 1e-5}
    out = hub.save_native(tmp_path / "ckpt", "encodec", config, state)
    assert out == tmp_path / "ckpt"
    assert hub.detect_layout(out) == "native"
    loaded_config, loaded = hub.load_native(out, "encodec")
    assert loaded_config == config
    assert same(loaded, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left


def test_native_errors(tmp_path):
    hub.save_native(tmp_path / "ckpt", "encodec", {}, tensors())
    with pytest.raises(CheckpointError, match=r"holds a 'encodec' model, expected 't5'"):
        hub.load_native(tmp_path / "ckpt", "t5")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(CheckpointError, match="is not a musiclm_core native config"):
        hub.load_native(tmp_path / "other", "t5")
    with pytest.raises(CheckpointError, match=r"missing file .*nothing.config\.json"):
        hub.load_native(tmp_path / "nothing", "t5")


def test_native_refuses_to_overwrite_unless_asked(tmp_path):
    folder = hub.save_native(tmp_path / "ckpt", "encodec", {"v": 1}, tensors(0))
    (folder / "stale.txt").write_text("from the old save")
    with pytest.raises(FileExistsError, match=r"ckpt exists; pass overwrite=True"):
        hub.save_native(folder, "encodec", {"v": 2}, tensors(1))
    assert hub.load_native(folder, "encodec")[0] == {"v": 1}
    hub.save_native(folder, "encodec", {"v": 2}, tensors(1), overwrite=True)
    config, state = hub.load_native(folder, "encodec")
    assert config == {"v": 2} and same(state, tensors(1))
    assert not (folder / "stale.txt").exists()  # replaced as a whole, not merged


def test_native_save_with_a_non_tensor_value_leaves_nothing(tmp_path):
    with pytest.raises(TypeError, match=r"these are not: \['scale'\]"):
        hub.save_native(tmp_path / "ckpt", "encodec", {}, {**tensors(), "scale": 2.0})
    assert list(tmp_path.iterdir()) == []


def test_native_save_failing_midway_leaves_nothing(tmp_path, monkeypatch):
    real_save_file = safetensors.torch.save_file

    def failing_save_file(state, filename, *args, **kwargs):
        real_save_file(dict(list(state.items())[:1]), filename)  # part of the file reaches the disk...
        raise OSError("No space left on device")  # ...then the write fails

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        hub.save_native(tmp_path / "ckpt", "encodec", {}, tensors())
    assert list(tmp_path.iterdir()) == []

    # A failed overwrite keeps the old folder as it was.
    monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)
    folder = hub.save_native(tmp_path / "ckpt", "encodec", {"v": 1}, tensors(0))
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        hub.save_native(folder, "encodec", {"v": 2}, tensors(1), overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    config, state = hub.load_native(folder, "encodec")
    assert config == {"v": 1} and same(state, tensors(0))
