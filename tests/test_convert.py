"""convert.py / mlx_gemma4.conversion: round trips against transformers, streaming memory, atomicity, bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4 import load
from mlx_gemma4.conversion import convert
from mlx_gemma4.errors import ConfigError, OutputError, WeightsError
from tests.fixtures_tokenizer import make_tokenizer
from tests.tiny import make_model, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# Overrides that make every quantizable dim divisible by 32 (PLE 7 x 32, experts 32 wide).
FAMILIES = {"e": dict(hidden_size_per_layer_input=32), "dense": {}, "moe": dict(moe_intermediate_size=32)}
IDS = np.random.default_rng(0).integers(5, 250, size=(1, 40))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """family -> (HF checkpoint dir, transformers float32 logits for IDS)."""
    import torch

    out = {}
    for family, overrides in FAMILIES.items():
        model = make_model(family, **overrides)
        path = make_tokenizer(save_checkpoint(model, tmp_path_factory.mktemp(family)))
        with torch.no_grad():
            out[family] = (path, model(input_ids=torch.tensor(IDS)).logits.numpy())
    return out


def _logits(path, **kw) -> np.ndarray:
    model, _ = load(path, **kw)
    return np.array(model(mx.array(IDS, dtype=mx.int32)).astype(mx.float32))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unquantized_round_trip_matches_transformers(sources, tmp_path, family):
    src, ref = sources[family]
    dst = convert(src, tmp_path / "out", dtype="float32")
    # float32 on both sides; the residual is summation order across ~7 layers and a 30-capped tanh (measured 8e-6).
    np.testing.assert_allclose(_logits(dst), ref, atol=1e-4, rtol=0)
    cfg = json.loads((dst / "config.json").read_text())
    assert "quantization" not in cfg and cfg["mlx_gemma4"]["dtype"] == "float32"
    assert (dst / "per_layer_embeddings.safetensors").exists() == (family == "e")


def test_hf_dir_loads_directly(sources):
    src, ref = sources["e"]
    np.testing.assert_allclose(_logits(src), ref, atol=1e-4, rtol=0)


def _cos_top1(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    return float(cos.mean()), float((a.argmax(-1) == b.argmax(-1)).mean())


# Mean cosine / top-1 agreement with the unquantized logits, measured on these random tiny models
# (e, dense, moe): 8-bit 0.996/0.78, 0.99+/0.9, 0.985/0.88; 4-bit 0.67/0.13, ... Random weights at hidden 64
# have near-flat logits, so top-1 flips easily; the bounds sit below every measurement with margin. The exact
# check is the fake-quantized comparison in test_quantize.py.
BOUNDS = {8: (0.95, 0.5), 4: (0.4, 0.0)}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_quantized_stays_close(sources, tmp_path, family, bits):
    src, ref = sources[family]
    dst = convert(src, tmp_path / "q", q_bits=bits, q_group_size=32, dtype="float32")
    cos, top1 = _cos_top1(_logits(dst), ref)
    print(f"{family} {bits}-bit: mean cosine {cos:.4f}, top-1 agreement {top1:.3f}")
    assert cos >= BOUNDS[bits][0] and top1 >= BOUNDS[bits][1]
    q = json.loads((dst / "config.json").read_text())["quantization"]
    assert q["bits"] == bits and q["group_size"] == 32


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_moe_runs_prefill_and_decode(sources, tmp_path, dtype):
    """Unquantized half-precision experts (MLX's CPU gather_mm multiplies float32 only; the CPU raised)."""
    src, ref = sources["moe"]
    model, _ = load(convert(src, tmp_path / dtype, dtype=dtype))
    logits = np.array(model(mx.array(IDS, dtype=mx.int32)).astype(mx.float32))
    cos, top1 = _cos_top1(logits, ref)
    print(f"moe {dtype}: mean cosine {cos:.5f}, top-1 agreement {top1:.3f}")
    # Measured: bfloat16 0.972 / 0.80 (transformers itself in bfloat16: 0.986; a rounded router picks other
    # experts for near ties), float16 0.99999 / 0.975.
    assert cos >= 0.95 and top1 >= 0.6
    cache = model.make_cache()
    model(mx.array(IDS[:, :8], dtype=mx.int32), cache=cache)
    step = model.step(mx.array(IDS[:, 8:9], dtype=mx.int32), cache)
    np.testing.assert_allclose(np.array(step.astype(mx.float32))[0, -1], logits[0, 8], atol=0.1, rtol=0)


def test_an_earlier_output_converts_again(sources, tmp_path):
    """Our own unquantized output as the source (to another dtype or to 4-bit): its PLE table, in a file of its
    own, was left out and the conversion stopped at a missing embed_tokens_per_layer."""
    src, _ = sources["e"]
    first = convert(src, tmp_path / "f32", dtype="float32")
    np.testing.assert_array_equal(_logits(convert(first, tmp_path / "again", dtype="float32")), _logits(first))
    np.testing.assert_array_equal(
        _logits(convert(first, tmp_path / "q4", q_bits=4, q_group_size=32, dtype="float32")),
        _logits(convert(src, tmp_path / "q4src", q_bits=4, q_group_size=32, dtype="float32")))


def test_mapped_ple_gives_same_logits_as_in_memory(sources, tmp_path):
    src, _ = sources["e"]
    for bits in (None, 8):
        dst = convert(src, tmp_path / f"ple{bits}", q_bits=bits, q_group_size=32, dtype="float32")
        model, _ = load(dst, mapped_ple=True)
        assert type(model.language_model.embed_tokens_per_layer).__name__ == "MappedPerLayerEmbedding"
        np.testing.assert_array_equal(_logits(dst, mapped_ple=True), _logits(dst, mapped_ple=False))
        # Decoding (the compiled one-token step) reads the mapped table too.
        steps = {}
        for mapped in (True, False):
            m, _ = load(dst, mapped_ple=mapped)
            cache = m.make_cache()
            m(mx.array(IDS[:, :8], dtype=mx.int32), cache=cache)
            steps[mapped] = np.array(mx.concatenate(
                [m.step(mx.array(IDS[:, t : t + 1], dtype=mx.int32), cache) for t in range(8, 14)], axis=1))
        np.testing.assert_array_equal(steps[True], steps[False])


def _tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (relative name -> bytes): what a refused run must leave untouched."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_force_replaces_only_an_earlier_output(sources, tmp_path):
    src, _ = sources["dense"]
    dst = convert(src, tmp_path / "dst", dtype="float32")
    marker = json.loads((dst / "mlx_gemma4_conversion.json").read_text())
    assert marker["converter"] == "mlx-gemma4 convert.py"
    assert set(marker["files"]) == {p.name for p in dst.iterdir()}
    with pytest.raises(OutputError, match="earlier conversion. Pass --force"):
        convert(src, dst, dtype="float32")
    first = (dst / "model.safetensors").stat().st_mtime_ns
    convert(src, dst, q_bits=8, q_group_size=32, dtype="float32", force=True)
    assert (dst / "model.safetensors").stat().st_mtime_ns != first
    assert json.loads((dst / "config.json").read_text())["quantization"]["bits"] == 8
    assert _leftovers(tmp_path) == []                            # no .dst.tmp-* nor .dst.old-*
    # A file the user put into an earlier output is never deleted, even with --force; the message names it.
    (dst / "notes.txt").write_text("mine")
    before = _tree(tmp_path)
    with pytest.raises(OutputError, match="notes.txt.*did not write|did not write.*notes.txt"):
        convert(src, dst, dtype="float32", force=True)
    assert _tree(tmp_path) == before


def test_force_never_replaces_a_folder_it_did_not_write(sources, tmp_path):
    src, _ = sources["dense"]
    dst = tmp_path / "dst"
    dst.mkdir()
    for name in ("notes.txt", "a.txt", "b.txt", "c.txt", "d.txt"):
        (dst / name).write_text(name)
    before = _tree(tmp_path)
    with pytest.raises(OutputError) as e:
        convert(src, dst, dtype="float32", force=True)
    assert "a.txt, b.txt" in str(e.value) and "not an output of convert.py" in str(e.value)
    assert _tree(tmp_path) == before and _leftovers(tmp_path) == []


@pytest.mark.parametrize("force", [False, True])
def test_a_destination_that_changes_during_the_conversion_is_not_replaced(sources, tmp_path, force):
    """The destination was checked only at the start: a folder the user made there while the conversion ran (or
    another conversion's output, without --force) was deleted at the end. It is checked again before the swap:
    nothing in it is touched, and the finished conversion is kept beside it, named in the error."""
    src, _ = sources["dense"]
    dst = tmp_path / "dst"

    def meanwhile(done, total, name):
        if done == 1:
            dst.mkdir()
            (dst / "notes.txt").write_text("mine")

    with pytest.raises(OutputError, match="not an output of convert.py.*changed while the conversion ran") as e:
        convert(src, dst, dtype="float32", force=force, progress=meanwhile)
    assert (dst / "notes.txt").read_text() == "mine" and [p.name for p in dst.iterdir()] == ["notes.txt"]
    [kept] = tmp_path.glob("dst.new-*")
    assert str(kept) in str(e.value) and load(kept)[0] is not None
    assert _leftovers(tmp_path) == []


def test_a_folder_holding_only_what_the_os_put_there_is_empty(sources, tmp_path):
    """A folder made in Finder gets a .DS_Store: it was 'already holds .DS_Store and is not an output'."""
    src, _ = sources["dense"]
    dst = tmp_path / "new"
    dst.mkdir()
    (dst / ".DS_Store").write_bytes(b"\0")
    convert(src, dst, dtype="float32")
    assert (dst / "config.json").is_file() and not (dst / ".DS_Store").exists()


def test_destination_is_never_the_source_or_around_it(sources, tmp_path):
    """--hf-path X --mlx-path X, an --mlx-path that contains the source (the home folder), one inside it."""
    home = tmp_path / "home"
    src = home / "ckpt"
    src.parent.mkdir()
    import shutil

    shutil.copytree(sources["dense"][0], src)
    (home / "thesis.tex").write_text("years of work")
    before = _tree(tmp_path)
    for dst, why in ((src, "is the source"), (home, "contains the source"), (src / "mlx", "lies inside the source")):
        with pytest.raises(OutputError, match=why):
            convert(src, dst, dtype="float32", force=True)
        assert _tree(tmp_path) == before
    # An earlier output that holds the source is not replaced either (the source would go with it).
    out = convert(sources["dense"][0], tmp_path / "out", dtype="float32")
    shutil.copytree(src, out / "ckpt")
    with pytest.raises(OutputError):
        convert(out / "ckpt", out, dtype="float32", force=True)
    assert (out / "ckpt" / "model.safetensors").exists()


def test_regular_file_as_destination_is_refused(sources, tmp_path):
    src, _ = sources["dense"]
    f = tmp_path / "model.bin"
    f.write_text("not a directory")
    with pytest.raises(OutputError, match="is a file"):
        convert(src, f, dtype="float32", force=True)
    assert f.read_text() == "not a directory" and _leftovers(tmp_path) == []


def test_dot_as_destination(sources, tmp_path, monkeypatch):
    src, _ = sources["dense"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("x")
    monkeypatch.chdir(busy)
    with pytest.raises(OutputError, match="notes.txt"):
        convert(src, ".", dtype="float32", force=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert convert(src, ".", dtype="float32") == empty.resolve()
    assert (empty / "config.json").exists() and _leftovers(tmp_path) == []


def test_default_destination_is_named_after_the_source_folder(sources, tmp_path, monkeypatch):
    """--hf-path .. (or .) gave the default destination models/-bfloat16: a name with nothing of the model in it."""
    import shutil

    src = tmp_path / "my-gemma"
    shutil.copytree(sources["dense"][0], src)
    work = src / "sub"
    work.mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(work)
    from mlx_gemma4.conversion import default_mlx_path

    assert default_mlx_path("..", None, "float32") == Path("models/my-gemma-float32")
    assert default_mlx_path(str(src) + "/", 4, "float32") == Path("models/my-gemma-4bit")
    assert default_mlx_path("google/gemma-4-E4B-it", 4, "bfloat16") == Path("models/gemma-4-E4B-it-4bit")
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert convert("../my-gemma", dtype="float32") == (tmp_path / "elsewhere" / "models" / "my-gemma-float32")


def test_output_of_an_earlier_version_is_recognised(sources, tmp_path):
    """Outputs written before the marker existed carry config.json's mlx_gemma4 section: --force replaces them
    when they hold only files the converter writes."""
    src, _ = sources["dense"]
    dst = convert(src, tmp_path / "dst", dtype="float32")
    (dst / "mlx_gemma4_conversion.json").unlink()
    convert(src, dst, dtype="float32", force=True)
    assert (dst / "mlx_gemma4_conversion.json").exists()


def test_disk_full_leaves_nothing_behind(sources, tmp_path, monkeypatch):
    import errno

    from mlx_gemma4.safetensors_io import TensorFileWriter

    src, _ = sources["e"]
    calls = []

    def full(self, name, row0, value):
        calls.append(name)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_rows(self, name, row0, value)

    write_rows = TensorFileWriter.write_rows
    monkeypatch.setattr(TensorFileWriter, "write_rows", full)
    with pytest.raises(OutputError, match="No space left on device") as e:
        convert(src, tmp_path / "out", dtype="float32")
    assert "\n" not in str(e.value) and "pick another --mlx-path" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_not_enough_free_space_is_refused_up_front(sources, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(OutputError, match=r"needs about \d+\.\d MB but .* has 0\.0 MB free"):   # (it said 0.0 GB)
        convert(sources["e"][0], tmp_path / "out", dtype="float32")
    assert list(tmp_path.iterdir()) == []


def test_a_file_above_the_destination_is_named(sources, tmp_path):
    """--mlx-path afile/sub failed mid-way with "File exists. Free some space ... or fix the folder's
    permissions"; the file in the way is named up front."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match=r"afile is a file, not a directory; nothing was changed"):
        convert(sources["e"][0], tmp_path / "afile" / "sub" / "out", dtype="float32")
    assert (tmp_path / "afile").read_text() == "x"


def test_cli_write_failure_is_one_line(sources, tmp_path):
    """A real failing write (the file-size limit makes write() fail with EFBIG): one line, exit 2, nothing left."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    r = subprocess.run([sys.executable, "convert.py", "--hf-path", str(sources["e"][0]), "--mlx-path",
                        str(tmp_path / "out"), "--dtype", "float32"], cwd=ROOT, capture_output=True, text=True,
                       preexec_fn=limit)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "Writing the conversion" in errors[0] and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_says_what_it_wrote_after_the_progress_bar(sources, tmp_path):
    """The "Wrote" line was logged while the bar still stood at 0%, on the bar's own line."""
    r = subprocess.run([sys.executable, "convert.py", "--hf-path", str(sources["e"][0]), "--mlx-path",
                        str(tmp_path / "out"), "--dtype", "float32"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    [wrote] = [i for i, line in enumerate(lines) if "Wrote" in line]
    assert lines[wrote].startswith("INFO Wrote"), r.stderr
    assert "100%" in lines[wrote - 1].rsplit("\r", 1)[-1], r.stderr  # the bar, finished, just before it
    assert not any("Converting" in line for line in lines[wrote:]), r.stderr


def test_bad_inputs(sources, tmp_path):
    src, _ = sources["moe"]
    (tmp_path / "no-config").mkdir()
    with pytest.raises(ConfigError, match="No config.json in .*--hf-path takes a Hugging Face Gemma 4 checkpoint"):
        convert(tmp_path / "no-config", tmp_path / "o1")
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="Gemma 4"):
        convert(other, tmp_path / "o2")
    # A source without weights: the converter's words (it was told to convert it again with convert.py).
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_bytes((src / "config.json").read_bytes())
    with pytest.raises(WeightsError, match="No [*].safetensors weight files in .*bare: the download did not finish"):
        convert(bare, tmp_path / "o2")
    with pytest.raises(ConfigError, match="--q-bits 7"):
        convert(src, tmp_path / "o3", q_bits=7)
    with pytest.raises(ConfigError, match="does not divide"):
        convert(src, tmp_path / "o4", q_bits=4, q_group_size=64)     # experts are 32 wide
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    (trunc / "config.json").write_bytes((src / "config.json").read_bytes())
    data = (src / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated"):
        convert(trunc, tmp_path / "o5")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


@pytest.mark.parametrize("flag, value, said", [
    ("--mlx-path", "", "--mlx-path '' is not a folder to write to"),
    ("--mlx-path", "  ", "is not a folder to write to"),
    ("--hf-path", "", "--hf-path path is empty"),
])
def test_cli_refuses_an_empty_path_and_writes_nothing(sources, tmp_path, flag, value, said):
    """An empty --mlx-path (an unset shell variable) used to write models/<name>-<dtype> into the current folder,
    and an empty --hf-path read the current folder as the checkpoint."""
    args = {"--hf-path": str(sources["e"][0]), "--mlx-path": str(tmp_path / "out"), flag: value}
    work = tmp_path / "cwd"
    work.mkdir()
    r = subprocess.run([sys.executable, str(ROOT / "convert.py"), *[x for kv in args.items() for x in kv]],
                       cwd=work, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert list(work.iterdir()) == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("size", ["0", "0MB", "0.0001KB"])
def test_cli_refuses_a_shard_size_under_one_byte(tmp_path, size):
    """--max-shard-size 0 used to write one shard per tensor."""
    r = subprocess.run([sys.executable, "convert.py", "--hf-path", str(tmp_path), "--mlx-path", str(tmp_path / "o"),
                        "--max-shard-size", size], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "at least one byte" in r.stderr and not (tmp_path / "o").exists()


def test_cli_refuses_quantization_flags_without_q_bits(sources, tmp_path):
    """--q-group-size / --ple-bits / --tower-bits without --q-bits were ignored without a word (the output
    unquantized), then with a warning lost above the progress bars: refused before anything is written."""
    for flags, said in ((["--q-group-size", "32", "--ple-bits", "4"], "--q-group-size and --ple-bits only matter"),
                        (["--tower-bits", "8"], "--tower-bits only matters when quantizing")):
        r = subprocess.run([sys.executable, "convert.py", "--hf-path", str(sources["e"][0]), "--mlx-path",
                            str(tmp_path / "out"), *flags], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and said in r.stderr and "--q-bits N" in r.stderr, r.stderr
        assert not (tmp_path / "out").exists()


def test_cli_rejects_unsupported_bits(tmp_path):
    r = subprocess.run([sys.executable, "convert.py", "--hf-path", str(tmp_path), "--q-bits", "7"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    from tests.random_checkpoint import MEDIUM_TEXT, hf_shapes, write

    path = write(tmp_path_factory.mktemp("medium"), MEDIUM_TEXT, "float32", shard_bytes=128 * 1024**2)
    sizes = [4 * int(np.prod(s)) for s in hf_shapes(MEDIUM_TEXT).values()]
    return path, max(sizes), sum(sizes)


# VmHWM (the peak RSS of this process image), not ru_maxrss: on Linux the latter survives exec, so a child of a
# large pytest process would report the parent's peak.
_RSS = """
import json, re, sys
sys.path.insert(0, {root!r})
def hwm():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
import convert as cli
import mlx_gemma4.conversion, mlx_gemma4.model
base = hwm()
rc = cli.main(sys.argv[1:])
print(json.dumps({{"base": base, "peak": hwm(), "rc": rc}}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_peak_memory_is_one_shard_plus_largest_tensor(medium, tmp_path):
    src, largest, total = medium
    shard = 64 * 1024**2
    r = subprocess.run([sys.executable, "-c", _RSS.format(root=str(ROOT)), "--hf-path", str(src), "--mlx-path",
                        str(tmp_path / "out"), "--dtype", "float32", "--max-shard-size", str(shard), "--weights-only"],
                       capture_output=True, text=True, cwd=ROOT)
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    assert stats["rc"] == 0
    grown = stats["peak"] - stats["base"]
    print(f"{total / 2**20:.0f} MB checkpoint: RSS grew {grown / 2**20:.0f} MB (largest {largest / 2**20:.0f} MB, "
          f"shard {shard / 2**20:.0f} MB)")
    # Measured: 417 MB of tensors -> +111 MB. Allow 64 MB for allocator slack and safetensors writes.
    assert grown <= largest + shard + 64 * 1024**2
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) >= total // shard


# The CLI, held after its first rows are written (the tiny conversions finish in well under a second): it
# touches FLAG and waits there for the test's signal, so the signal lands mid-conversion every time.
_HELD = """
import pathlib, sys, time
sys.path.insert(0, {root!r})
import convert as cli
from mlx_gemma4.safetensors_io import TensorFileWriter
write_rows = TensorFileWriter.write_rows
def held(self, *args):
    write_rows(self, *args)
    pathlib.Path({flag!r}).touch()
    while True:
        time.sleep(0.05)
TensorFileWriter.write_rows = held
sys.exit(cli.main(sys.argv[1:]))
"""


def _held_conversion(src: Path, dst: Path, flag: Path, preexec_fn=None) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _HELD.format(root=str(ROOT), flag=str(flag)), "--hf-path", str(src),
                          "--mlx-path", str(dst), "--dtype", "float32"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)
    while not flag.exists():               # the event: a tensor is in the temp dir
        assert p.poll() is None, p.communicate()
        time.sleep(0.02)
    assert [q for q in dst.parent.iterdir() if q.name.startswith(f".{dst.name}.tmp-")]
    return p


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_removes_the_partial_conversion(sources, tmp_path, sig):
    """Ctrl+C, kill and a closed terminal: the temp dir goes, one line and no traceback, exit 128 + signal."""
    out = tmp_path / "out"
    out.mkdir()
    p = _held_conversion(sources["e"][0], out / "model", tmp_path / "flag")
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("Interrupted")
    assert list(out.iterdir()) == []


def test_a_conversion_started_with_nohup_survives_a_closed_terminal(sources, tmp_path):
    """nohup has SIGHUP ignored: convert.py put its own handler in its place, and a closed terminal stopped the
    run (exit 129). The SIGHUP is ignored; the SIGTERM after it still stops the run."""
    out = tmp_path / "out"
    out.mkdir()
    p = _held_conversion(sources["e"][0], out / "model", tmp_path / "flag",
                         preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    p.send_signal(signal.SIGHUP)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM and "Interrupted (SIGTERM)" in err
    assert list(out.iterdir()) == []


def test_a_signal_while_mlx_is_imported_ends_with_the_one_line(sources, tmp_path):
    """A signal raised inside the import of MLX (its extension's start-up) became an ImportError traceback or an
    abort: while the imports run, a signal is noted, and the run ends with the one line once they are done."""
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import convert as cli
class Hook:   # fires inside mlx.core's start-up, which imports this helper (or, failing that, at mlx.nn)
    fired = False
    def find_spec(self, name, *args):
        if name in ("mlx._reprlib_fix", "mlx.nn") and not Hook.fired:
            Hook.fired = True
            os.kill(os.getpid(), signal.SIGTERM)
sys.meta_path.insert(0, Hook())
sys.exit(cli.main(sys.argv[1:]))
"""
    r = subprocess.run([sys.executable, "-c", script, "--hf-path", str(sources["e"][0]), "--mlx-path",
                        str(tmp_path / "o"), "--dtype", "float32"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 128 + signal.SIGTERM and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("Interrupted (SIGTERM)") and not (tmp_path / "o").exists()


def test_killed_conversion_is_cleaned_up_by_the_next_run(sources, tmp_path):
    """SIGKILL cannot be caught: the next run for the same destination removes what it left, and only that."""
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "model"
    p = _held_conversion(sources["e"][0], dst, tmp_path / "flag")
    p.kill()
    p.communicate()
    stale = [q for q in out.iterdir() if q.name.startswith(".model.tmp-")]
    assert len(stale) == 1 and (stale[0] / "mlx_gemma4_conversion.json").exists() and not dst.exists()
    # Not ours (no marker), and ours but from a run that is still going (the parent of this process is alive):
    # both stay.
    (out / ".model.tmp-notmine").mkdir()
    (out / ".model.tmp-notmine" / "data").write_text("x")
    running = out / ".model.tmp-running"
    running.mkdir()
    (running / "mlx_gemma4_conversion.json").write_text(json.dumps(
        {"converter": "mlx-gemma4 convert.py", "pid": os.getppid(), "host": __import__("socket").gethostname()}))
    convert(sources["e"][0], dst, dtype="float32")
    assert sorted(q.name for q in out.iterdir()) == [".model.tmp-notmine", ".model.tmp-running", "model"]


@pytest.mark.parametrize("q_bits", [None, 8])
def test_round_trip_with_vision_and_audio_towers(checkpoint_factory, tmp_path, q_bits):
    """Towers convert too: unquantized, an image + audio prompt gives the source's logits; at 8 bits (towers at
    --tower-bits 8) it stays close."""
    from PIL import Image

    from tests.helpers import MODEL_ATOL, reference_logits, tone
    from tests.tiny import AUDIO_128, VISION

    hf, src = checkpoint_factory("e", vision=VISION, audio=AUDIO_128)
    dst = convert(src, tmp_path / "out", q_bits=q_bits, q_group_size=32, dtype="float32")
    model, processor = load(dst)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    inputs = processor(text="see <|image|> hear <|audio|> now", images=[image], audio=[tone(0.6)],
                       max_soft_tokens=70)
    ours = np.array(model(**inputs))
    ref = reference_logits(hf, inputs)
    if q_bits is None:
        np.testing.assert_allclose(ours, ref, atol=MODEL_ATOL, rtol=0)
    else:
        a, b = ours.reshape(-1, ours.shape[-1]), ref.reshape(-1, ref.shape[-1])
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        # Measured 0.93 (a text-only prompt on the same checkpoint gives 0.93 too: tiny random weights have
        # near-flat logits, so 8-bit rounding moves their direction more than it would a trained model's).
        assert cos.mean() > 0.85


def test_cli_refuses_a_checkpoint_without_tokenizer_before_converting(tmp_path):
    """A checkpoint without tokenizer files converted in full, exit 0, into a model load() refuses (a WARNING
    among the logs): on a 31B, found out only after the whole conversion. Refused before anything is written,
    unless --weights-only; a drafter (it uses its model's tokenizer) needs none."""
    src = save_checkpoint(make_model("dense"), tmp_path / "bare")
    r = subprocess.run([sys.executable, "convert.py", "--hf-path", str(src), "--mlx-path", str(tmp_path / "out"),
                        "--dtype", "float32"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "has no tokenizer files" in r.stderr and "--weights-only" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists() and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "convert.py", "--hf-path", str(src), "--mlx-path", str(tmp_path / "out"),
                        "--dtype", "float32", "--weights-only"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "out" / "config.json").is_file(), r.stderr
