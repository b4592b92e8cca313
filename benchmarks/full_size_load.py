"""The full-size model from real-format weight files, on the CPU: load time and peak host memory (issue 21, item 6).

    python benchmarks/full_size_load.py /tmp/fullsize            # ≈ 16 GB of disk, needs ≈ 16 GiB of free memory
    python benchmarks/full_size_load.py /tmp/fs_tiny --tiny      # the same code path at tests/tiny.py widths (tests)
    python benchmarks/full_size_load.py benchmarks/results/full_size_load.json --markdown   # BENCHMARKS.md's section

1. Writes into DIR, with random values at the real shapes and dtypes:

   * ``Llama-2-7b-chat-hf/``: ``config.json`` and ``generation_config.json`` with the fields of the
     Hugging Face release, fp16 safetensors shards + ``model.safetensors.index.json``, and the real
     ``tokenizer.model`` from ``../shared/data/tokenizer/llama2`` when present (else the project's
     tiny tokenizer, whose 512 pieces fit in the 32,000-entry vocabulary);
   * ``eva_vit_g.pth``: the BLIP-2 / LAVIS key layout of EVA-CLIP-g (40 blocks, 16×16 position
     grid of the 224-pixel training size), fp16;
   * ``checkpoint_stage3.pth``: MiniGPT-v2's stage-3 file as its runner saves it (``{"model": …,
     "optimizer": …, "config": …, "scaler": …, "epoch": …}``): peft-0.2 LoRA names on q,v (r 64,
     fp32), ``llama_proj`` (fp32) and the ``rotary_emb.inv_freq`` buffers transformers 4.30 kept in
     every state dict (their true values);
   * ``reduced/``: the full-width, 2-layer LLaMA of the training step (a config and an index over
     the same shard files) and a 2-layer stage-3 file (the same tensors as the full one's layers 0–1).

   The values are **not** good random numbers: one block of ≈ 1 M normal values is tiled into
   every tensor from an offset derived from the tensor's name (fast on a shared core; never all
   zeros, different tensors differ); norm weights are 1 + that noise.
2. Loads them in child processes, one per entry point, as the entry points do: ``train.py
   --cfg-path train_configs/stage1_pancreas_detection.yaml`` (``check_weight_files`` +
   ``build_model``: EVA, LLaMA, ``init_from`` = the stage-3 file) and ``demo.py --cfg-path
   eval_configs/demo.yaml`` (``load_service``, ``model.ckpt`` = the stage-3 file), with
   ``model.dtype=bf16`` (what ``auto`` gives on a GPU; ``auto`` is fp32 on a CPU) and
   ``run.device=cpu``. Each prints its wall time and peak host memory: anonymous RSS (RssAnon of
   ``/proc/self/status`` sampled every 20 ms in a thread), file-backed RSS (RssFile: pages mapped
   from the weight files and libraries, which the kernel can drop) and ``ru_maxrss``; then every key
   of every file is compared with the loaded model (equal values after the dtype conversion) or
   reported (EVA's 40th block, the ``inv_freq`` buffers that transformers now recomputes).
3. One training step of the full-width, reduced-depth model (LLaMA 4096 wide, 2 layers; EVA 1408
   wide, 2 blocks) in fp32 from those files, through ``train.py``'s own ``main`` (phantom CT data):
   the loss, the exact set of parameters with a gradient (the trainable q,k LoRA and ``llama_proj``
   only) and the adapters active in the step (the frozen stage-3 q,v adapter among them).

A parent watchdog kills a phase whose RssAnon passes ``--abort-gib`` (default 21) so that a
regression cannot take a 24 GiB machine down. ``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from minigpt4.io import to_json  # noqa: E402

STAGE1 = ROOT / "train_configs" / "stage1_pancreas_detection.yaml"
DEMO = ROOT / "eval_configs" / "demo.yaml"
LLAMA_DIR = "Llama-2-7b-chat-hf"
EVA_FILE = "eva_vit_g.pth"
STAGE3_FILE = "checkpoint_stage3.pth"
REDUCED = "reduced"
STEP_LAYERS = 2
"""Depth of the training step's LLaMA and EVA (full width)."""
GIB = 2**30
TARGET_RATIO = 1.25
"""Peak anonymous RSS allowed, as a multiple of the bf16 size of the LLaMA + EVA weights."""
LORA_PREFIX = "llama_model.base_model.model.model.layers"


@dataclass(frozen=True)
class Sizes:
    """Shapes of the written files and the model sizes of the configs."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    eva_width: int
    eva_blocks: int  # in the file (EVA-CLIP-g: 40)
    eva_depth: int  # used by the model (BLIP-2: 39)
    eva_heads: int
    eva_mlp: int
    file_grid: int  # position grid of the file (224 px / 14)
    image_size: int
    lora_r: int
    shard_bytes: int

    def options(self) -> list[str]:
        """Config overrides for the model sizes that do not come from the LLaMA folder."""
        return [f"model.vision.image_size={self.image_size}", f"model.vision.width={self.eva_width}",
                f"model.vision.depth={self.eva_depth}", f"model.vision.num_heads={self.eva_heads}",
                f"model.vision.mlp_hidden={self.eva_mlp}", f"model.lora.r={self.lora_r}"]


FULL = Sizes(vocab=32000, hidden=4096, intermediate=11008, layers=32, heads=32, eva_width=1408, eva_blocks=40,
             eva_depth=39, eva_heads=16, eva_mlp=6144, file_grid=16, image_size=448, lora_r=64, shard_bytes=2 * GIB)
TINY = Sizes(vocab=512, hidden=64, intermediate=128, layers=3, heads=4, eva_width=64, eva_blocks=4, eva_depth=3,
             eva_heads=4, eva_mlp=128, file_grid=4, image_size=112, lora_r=8, shard_bytes=200_000)


# --------------------------------------------------------------------------- cheap random values
class TiledNoise:
    """Tensors filled by tiling one block of normal values from a per-name offset (see module docstring)."""

    def __init__(self, block: int = (1 << 20) + 7, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(block, generator=generator)
        self.block = block
        self.doubled = torch.cat((noise, noise))  # any window of `block` values is a slice

    def tensor(self, name: str, shape: Sequence[int], dtype: torch.dtype, std: float = 0.02, mean: float = 0.0) -> torch.Tensor:
        numel = math.prod(shape)
        out = torch.empty(numel, dtype=dtype)
        offset = zlib.crc32(name.encode()) % self.block
        for start in range(0, numel, self.block):
            count = min(self.block, numel - start)
            out[start:start + count].copy_(self.doubled[offset:offset + count])
        out.mul_(std)
        if mean:
            out.add_(mean)
        return out.view(*shape)


# --------------------------------------------------------------------------- writing the files
INV_FREQ = ".rotary_emb.inv_freq"
"""Suffix of the rotary buffers transformers ≤ 4.30 saved (the release's shards hold them: its index's
``total_size`` is 2 bytes × 6,738,415,616 parameters + 32 × 64 fp32 values); transformers now
recomputes them."""


def rotary_inv_freq(s: Sizes) -> torch.Tensor:
    """The true ``inv_freq`` values (θ = 10000, head_dim = hidden / heads), fp32, (head_dim / 2,)."""
    head_dim = s.hidden // s.heads
    return 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def llama_shapes(s: Sizes, layers: int) -> dict[str, tuple[int, ...]]:
    """HF ``LlamaForCausalLM`` tensor names → shapes, in the release's order (``inv_freq`` buffers included)."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (s.vocab, s.hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes[f"{p}self_attn{INV_FREQ}"] = (s.hidden // s.heads // 2,)
        for m in ("q", "k", "v", "o"):
            shapes[f"{p}self_attn.{m}_proj.weight"] = (s.hidden, s.hidden)
        shapes[f"{p}mlp.gate_proj.weight"] = (s.intermediate, s.hidden)
        shapes[f"{p}mlp.up_proj.weight"] = (s.intermediate, s.hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (s.hidden, s.intermediate)
        shapes[f"{p}input_layernorm.weight"] = (s.hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (s.hidden,)
    shapes["model.norm.weight"] = (s.hidden,)
    shapes["lm_head.weight"] = (s.vocab, s.hidden)
    return shapes


def llama_config_json(s: Sizes, layers: int) -> dict:
    """``config.json`` of meta-llama/Llama-2-7b-chat-hf (its fields and values), at ``s``'s sizes."""
    return {
        "_name_or_path": "meta-llama/Llama-2-7b-chat-hf", "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": s.hidden,
        "initializer_range": 0.02, "intermediate_size": s.intermediate, "max_position_embeddings": 4096,
        "model_type": "llama", "num_attention_heads": s.heads, "num_hidden_layers": layers,
        "num_key_value_heads": s.heads, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.32.0.dev0",
        "use_cache": True, "vocab_size": s.vocab,
    }


GENERATION_CONFIG = {"bos_token_id": 1, "do_sample": True, "eos_token_id": 2, "max_length": 4096, "pad_token_id": 0,
                     "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.32.0.dev0"}


def _write_json(path: Path, obj: dict) -> None:
    from minigpt4.io import write_text_atomic

    write_text_atomic(path, to_json(obj, indent=2) + "\n")


def tokenizer_source(tiny: bool) -> tuple[Path, str]:
    """``(tokenizer.model to copy, description)``: the real LLaMA-2 one at full size when present."""
    from minigpt4.tokenizer import tiny_tokenizer_path

    if not tiny:
        from benchmarks.full_size import llama2_tokenizer_path

        real = llama2_tokenizer_path()
        if real is not None:
            return real, f"LLaMA-2 ({real})"
    return Path(tiny_tokenizer_path()), "the project's tiny tokenizer (512 pieces)"


def write_llama(folder: Path, s: Sizes, noise: TiledNoise, tokenizer: Path) -> dict:
    """The Hugging Face folder: configs, fp16 shards of ≤ ``s.shard_bytes``, index, tokenizer."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    shapes = llama_shapes(s, s.layers)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = (4 if name.endswith(INV_FREQ) else 2) * math.prod(shape)
        if groups[-1] and size + nbytes > s.shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for index, names in enumerate(groups, 1):
        file = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: rotary_inv_freq(s) if n.endswith(INV_FREQ) else
                   noise.tensor(n, shapes[n], torch.float16, mean=1.0 if n.endswith("norm.weight") else 0.0)
                   for n in names}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    _write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(folder / "config.json", llama_config_json(s, s.layers))
    _write_json(folder / "generation_config.json", GENERATION_CONFIG)
    shutil.copyfile(tokenizer, folder / "tokenizer.model")
    return {"bytes": total, "shards": len(groups), "tensors": len(shapes)}


def write_reduced_llama(full: Path, folder: Path, s: Sizes, layers: int) -> None:
    """A ``layers``-deep LLaMA folder over the full folder's shard files (symlinks, a subset index)."""
    folder.mkdir(parents=True, exist_ok=True)
    index = json.loads((full / "model.safetensors.index.json").read_text())
    keep = set(llama_shapes(s, layers))
    weight_map = {k: v for k, v in index["weight_map"].items() if k in keep}
    for file in set(weight_map.values()):
        link = folder / file
        if not link.exists():
            link.symlink_to(full / file)
    _write_json(folder / "model.safetensors.index.json", {"metadata": index["metadata"], "weight_map": weight_map})
    _write_json(folder / "config.json", llama_config_json(s, layers))
    for name in ("generation_config.json", "tokenizer.model"):
        shutil.copyfile(full / name, folder / name)


def eva_file_state(s: Sizes, noise: TiledNoise) -> dict[str, torch.Tensor]:
    """LAVIS ``eva_vit_g.pth`` keys, fp16 (``s.eva_blocks`` blocks, ``s.file_grid``² positions)."""
    C, H, P = s.eva_width, s.eva_mlp, 14
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, C), "pos_embed": (1, 1 + s.file_grid**2, C),
        "patch_embed.proj.weight": (C, 3, P, P), "patch_embed.proj.bias": (C,),
    }
    block = {"norm1.weight": (C,), "norm1.bias": (C,), "attn.q_bias": (C,), "attn.v_bias": (C,),
             "attn.qkv.weight": (3 * C, C), "attn.proj.weight": (C, C), "attn.proj.bias": (C,),
             "norm2.weight": (C,), "norm2.bias": (C,), "mlp.fc1.weight": (H, C), "mlp.fc1.bias": (H,),
             "mlp.fc2.weight": (C, H), "mlp.fc2.bias": (C,)}
    for i in range(s.eva_blocks):
        shapes.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return {n: noise.tensor(n, shape, torch.float16, mean=1.0 if ".norm" in n and n.endswith("weight") else 0.0)
            for n, shape in shapes.items()}


def stage3_model_state(s: Sizes, noise: TiledNoise, layers: int) -> dict[str, torch.Tensor]:
    """The ``"model"`` dict of MiniGPT-v2's stage-3 checkpoint (runner's save: trainable tensors + buffers)."""
    inv_freq = rotary_inv_freq(s)
    state = {}
    for i in range(layers):
        for m in ("q_proj", "v_proj"):
            a, b = f"{LORA_PREFIX}.{i}.self_attn.{m}.lora_A.weight", f"{LORA_PREFIX}.{i}.self_attn.{m}.lora_B.weight"
            state[a] = noise.tensor(a, (s.lora_r, s.hidden), torch.float32)
            state[b] = noise.tensor(b, (s.hidden, s.lora_r), torch.float32)
        state[f"{LORA_PREFIX}.{i}.self_attn{INV_FREQ}"] = inv_freq.clone()
    state["llama_proj.weight"] = noise.tensor("llama_proj.weight", (s.hidden, 4 * s.eva_width), torch.float32)
    state["llama_proj.bias"] = noise.tensor("llama_proj.bias", (s.hidden,), torch.float32)
    return state


def save_stage3(path: Path, state: dict[str, torch.Tensor]) -> None:
    # what MiniGPT-4's runner writes around the model dict (optimizer state left small)
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5}]},
                "config": {"run": {"seed": 42}}, "scaler": None, "epoch": 4}, path)


def write_files(folder: Path, s: Sizes, tiny: bool) -> dict:
    """Every file of the benchmark (module docstring, step 1); returns sizes and timing."""
    t0 = time.perf_counter()
    noise = TiledNoise()
    tokenizer, tokenizer_text = tokenizer_source(tiny)
    llama = write_llama(folder / LLAMA_DIR, s, noise, tokenizer)
    torch.save(eva_file_state(s, noise), folder / EVA_FILE)
    save_stage3(folder / STAGE3_FILE, stage3_model_state(s, noise, s.layers))
    write_reduced_llama(folder / LLAMA_DIR, folder / REDUCED / LLAMA_DIR, s, STEP_LAYERS)
    save_stage3(folder / REDUCED / STAGE3_FILE, stage3_model_state(s, noise, STEP_LAYERS))
    return {"llama_bytes": llama["bytes"], "llama_shards": llama["shards"], "llama_tensors": llama["tensors"],
            "eva_bytes": (folder / EVA_FILE).stat().st_size, "stage3_bytes": (folder / STAGE3_FILE).stat().st_size,
            "tokenizer": tokenizer_text, "write_s": time.perf_counter() - t0}


# --------------------------------------------------------------------------- memory
def _status_kib(text: str, field: str) -> int:
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def read_status(pid: str = "self") -> dict[str, int]:
    """RssAnon, RssFile, VmRSS, VmHWM of a process in KiB (Linux ``/proc``)."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {f: _status_kib(text, f) for f in ("RssAnon", "RssFile", "VmRSS", "VmHWM")}


class PeakMemory:
    """Samples this process's ``/proc/self/status`` in a thread; ``stop()`` → peaks in GiB."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.peak = read_status()
        self.start = dict(self.peak)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = read_status()
            self.peak = {k: max(v, self.peak[k]) for k, v in now.items()}
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        now = read_status()
        self.peak = {k: max(v, self.peak[k]) for k, v in now.items()}

    def figures(self) -> dict[str, float]:
        maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return {"start_rss_anon_gib": self.start["RssAnon"] / 2**20, "peak_rss_anon_gib": self.peak["RssAnon"] / 2**20, "peak_rss_file_gib": self.peak["RssFile"] / 2**20,
                "vm_hwm_gib": self.peak["VmHWM"] / 2**20, "ru_maxrss_gib": maxrss_kib / 2**20}


# --------------------------------------------------------------------------- key accounting
def _plain_name(name: str) -> str:
    return name.replace(".base_layer.", ".")


def verify_llama(model, folder: Path) -> dict:
    """Every tensor of the shards equals the loaded base weight (after the fp16 → model dtype conversion);
    the ``inv_freq`` buffers are reported and compared with the buffer transformers recomputes."""
    from safetensors import safe_open

    params = {_plain_name(n): p for n, p in model.llama.named_parameters() if ".lora_" not in n}
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    recomputed = model.llama.model.rotary_emb.inv_freq.float().cpu()
    equal, different, inv_freq = [], [], []
    for file in sorted(set(weight_map.values())):
        with safe_open(str(folder / file), framework="pt") as f:
            for key in f.keys():
                if key not in weight_map:
                    continue  # a reduced folder's index leaves deeper layers out
                if key.endswith(INV_FREQ):
                    (inv_freq if torch.allclose(recomputed, f.get_tensor(key), rtol=1e-6) else different).append(key)
                    continue
                param = params.get(key)
                same = param is not None and torch.equal(param.detach(), f.get_tensor(key).to(param.dtype))
                (equal if same else different).append(key)
    return {"equal": len(equal), "different": different, "inv_freq_reported": len(inv_freq),
            "not_in_file": sorted(set(params) - set(weight_map))}


def verify_eva(model, path: Path) -> dict:
    """Every key of ``eva_vit_g.pth``: equal, interpolated (pos_embed) or ignored (blocks ≥ depth)."""
    from minigpt4.models.eva_vit import interpolate_pos_embed

    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    params = dict(model.visual_encoder.named_parameters())
    depth = model.cfg.vision.depth
    equal, different, ignored, interpolated = [], [], [], []
    for key, value in state.items():
        if key.startswith("blocks.") and int(key.split(".")[1]) >= depth:
            ignored.append(key)
            continue
        param = params.get(key)
        if key == "pos_embed" and param is not None and value.shape != param.shape:
            value = interpolate_pos_embed(value, model.cfg.vision.num_patches)
            (interpolated if torch.equal(param.detach(), value.to(param.dtype)) else different).append(key)
            continue
        same = param is not None and value.shape == param.shape and torch.equal(param.detach(), value.to(param.dtype))
        (equal if same else different).append(key)
    return {"equal": len(equal), "interpolated": interpolated, "ignored_blocks": sorted({int(k.split(".")[1]) for k in ignored}),
            "ignored": len(ignored), "different": different, "not_in_file": sorted(set(params) - set(state))}


def verify_stage3(model, path: Path) -> dict:
    """Every key of the stage-3 file: ``llama_proj`` and the frozen q,v adapter equal to the file;
    the ``inv_freq`` buffers reported (transformers ≥ 4.31 recomputes them) and compared with the
    model's recomputed buffer."""
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    stack = model.adapter_stack()
    frozen = [e for e in stack if e["source"] == str(path)]
    adapter = model.adapter_tensors(frozen[0]["name"]) if frozen else {}
    recomputed = model.llama.model.rotary_emb.inv_freq.float().cpu()
    equal, different, inv_freq = [], [], []
    for key, value in state.items():
        if key.endswith(INV_FREQ):
            (inv_freq if torch.allclose(recomputed, value, rtol=1e-6) else different).append(key)
            continue
        if key.startswith("llama_proj."):
            target = getattr(model.llama_proj, key.split(".")[1])
        else:
            target = adapter.get(key)
        same = target is not None and torch.equal(target.detach().cpu(), value.to(target.dtype))
        (equal if same else different).append(key)
    return {"equal": len(equal), "different": different, "inv_freq_reported": len(inv_freq),
            "adapter": frozen[0] if frozen else None}


def account_keys(model, folder: Path, llama_dir: Path, stage3: Path) -> dict:
    keys = {"llama": verify_llama(model, llama_dir), "eva": verify_eva(model, folder / EVA_FILE),
            "stage3": verify_stage3(model, stage3)}
    keys["all_matched_or_reported"] = (
        not any(keys[k]["different"] for k in ("llama", "eva", "stage3"))
        and not keys["llama"]["not_in_file"] and not keys["eva"]["not_in_file"]
        and keys["stage3"]["adapter"] is not None and keys["stage3"]["adapter"]["active"]
    )
    return keys


# --------------------------------------------------------------------------- phases (child processes)
def weight_options(folder: Path) -> list[str]:
    return [f"model.vision.weights={folder / EVA_FILE}", f"model.text.path={folder / LLAMA_DIR}",
            "model.text.tokenizer=null", "model.dtype=bf16", "run.device=cpu"]


def bf16_weight_bytes(model) -> int:
    """2 bytes per LLaMA-base and EVA parameter (the issue's reference size)."""
    base = sum(p.numel() for n, p in model.llama.named_parameters() if ".lora_" not in n)
    return 2 * (base + sum(p.numel() for p in model.visual_encoder.parameters()))


def phase_load(entry: str, folder: Path, s: Sizes) -> dict:
    """``train``: as train.py builds its model; ``demo``: as demo.py's ``load_service``."""
    from minigpt4.config import load_config
    from minigpt4.utils import seed_everything

    options = [*weight_options(folder), *s.options()]
    with PeakMemory() as memory:
        t0 = time.perf_counter()
        if entry == "train":
            from minigpt4.models.minigpt_v2 import build_model
            from minigpt4.training.checks import check_weight_files

            cfg = load_config(STAGE1, [*options, f"model.init_from={folder / STAGE3_FILE}"])
            check_weight_files(cfg)
            seed_everything(cfg.run.seed)
            model = build_model(cfg.model, torch.device("cpu"))
        else:
            from minigpt4.demo.service import load_service

            cfg = load_config(DEMO, [*options, f"model.ckpt={folder / STAGE3_FILE}"])
            model = load_service(cfg, device="cpu").model
        load_s = time.perf_counter() - t0
    result = {"entry": entry, "load_s": load_s, **memory.figures(), "bf16_weights_gib": bf16_weight_bytes(model) / GIB,
              "dtype": str(model.dtype).replace("torch.", "")}
    result["ratio"] = result["peak_rss_anon_gib"] / result["bf16_weights_gib"]
    t0 = time.perf_counter()
    result["keys"] = account_keys(model, folder, folder / LLAMA_DIR, folder / STAGE3_FILE)
    result["verify_s"] = time.perf_counter() - t0
    return result


def _synthetic_data(folder: Path) -> Path:
    from preprocessing import pipeline, synthetic

    prepared = folder / "prep"
    if not (prepared / "split.json").is_file():
        raw = synthetic.generate(folder / "raw", scheme="msd", n=6, n_slices=24, size=128, seed=0, log=lambda *a: None,
                                 overwrite=True)
        opts = pipeline.Options(dataset="MSD", images=[raw["images"]], labels=raw["labels"], out=str(prepared))
        pipeline.prepare(opts, log=lambda *a: None)
    return prepared


def phase_step(folder: Path, s: Sizes) -> dict:
    """One optimizer step of ``train.py`` (stage-1 config) on the full-width, reduced-depth model, fp32."""
    import train as train_entry
    import transformers

    from minigpt4.training import trainer  # build_model as the trainer imported it (module-top import)

    # the reduced folder's index leaves layers 2… out of shards that hold them: HF would list each
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()

    data = _synthetic_data(folder / "step_data")
    out = folder / "step_run"
    shutil.rmtree(out, ignore_errors=True)
    reduced = folder / REDUCED
    argv = ["--cfg-path", str(STAGE1), "--options", *s.options(),
            f"model.vision.weights={folder / EVA_FILE}", f"model.vision.depth={STEP_LAYERS}",
            f"model.text.path={reduced / LLAMA_DIR}", "model.text.tokenizer=null",
            f"model.init_from={reduced / STAGE3_FILE}", "model.dtype=fp32", "run.amp=none", "run.device=cpu",
            "run.batch_size=1", "run.grad_accum_steps=1", "run.iters_per_epoch=1", "run.max_epoch=1",
            "run.validate=false", "run.num_workers=0", "run.resume=null", "run.log_interval=1",
            f"run.output_dir={out}", f"datasets.msd_pancreas.root={data}", f"datasets.nih_pancreas.root={data}"]
    built: list = []
    seen: dict = {}

    def capture(*args, **kwargs):
        model = original(*args, **kwargs)
        built.append(model)
        return model

    def before_step(optimizer, args, kwargs):  # the trainer's own optimizer.step(), gradients complete
        model = built[-1]
        seen["grads"] = sorted(n for n, p in model.named_parameters() if p.grad is not None)
        seen["requires_grad"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        seen["grads_finite"] = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
        seen["active_adapters"] = model.active_adapters()
        seen["adapter_stack"] = model.adapter_stack()

    original = trainer.build_model
    trainer.build_model = capture
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    hook = register_optimizer_step_pre_hook(before_step)
    try:
        with PeakMemory() as memory:
            t0 = time.perf_counter()
            code = train_entry.main(argv)
            step_s = time.perf_counter() - t0
    finally:
        hook.remove()
        trainer.build_model = original
        transformers.logging.set_verbosity(verbosity)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "step"]
    model = built[-1]
    expected = sorted([f"llama_model.base_model.model.model.layers.{i}.self_attn.{m}_proj.lora_{ab}.default.weight"
                       for i in range(STEP_LAYERS) for m in ("q", "k") for ab in ("A", "B")]
                      + ["llama_proj.bias", "llama_proj.weight"])
    stage3 = [e for e in seen.get("adapter_stack", []) if e["source"] == str(reduced / STAGE3_FILE)]
    return {
        "exit_code": code, "losses": losses, "loss_finite": bool(losses) and all(math.isfinite(x) for x in losses),
        "step_s": step_s, **memory.figures(),
        "llama": f"{model.llama.config.num_hidden_layers} layers × {model.llama.config.hidden_size}",
        "eva": f"{len(model.visual_encoder.blocks)} blocks × {model.cfg.vision.width}",
        "grads": seen.get("grads"), "expected_grads": expected, "grads_exact": seen.get("grads") == expected,
        "requires_grad_exact": seen.get("requires_grad") == expected, "grads_finite": seen.get("grads_finite"),
        "active_adapters": seen.get("active_adapters"),
        "frozen_qv_adapter_active": bool(stage3) and stage3[0]["active"] and not stage3[0]["trainable"]
        and stage3[0]["targets"] == ["q_proj", "v_proj"] and stage3[0]["name"] in seen["active_adapters"],
    }


# --------------------------------------------------------------------------- parent
def run_phase(phase: str, folder: Path, tiny: bool, abort_gib: float) -> dict:
    """Run one phase in a child process under an RssAnon watchdog; its JSON result."""
    result_file = folder / f"phase_{phase}.json"
    result_file.unlink(missing_ok=True)
    argv = [sys.executable, str(Path(__file__).resolve()), str(folder), "--phase", phase, "--result", str(result_file)]
    if tiny:
        argv.append("--tiny")
    child = subprocess.Popen(argv)
    peak, aborted = 0, False
    while child.poll() is None:
        try:
            anon = read_status(str(child.pid))["RssAnon"]
        except (FileNotFoundError, ProcessLookupError):
            break
        peak = max(peak, anon)
        if anon > abort_gib * 2**20:
            child.kill()
            aborted = True
            break
        time.sleep(0.1)
    code = child.wait()
    if aborted:
        return {"phase": phase, "aborted": f"RssAnon passed {abort_gib} GiB (watchdog)", "watchdog_peak_gib": peak / 2**20}
    if code != 0 or not result_file.is_file():
        return {"phase": phase, "failed": f"exit code {code}"}
    return json.loads(result_file.read_text())


def _keys_line(keys: dict) -> str:
    llama, eva, s3 = keys["llama"], keys["eva"], keys["stage3"]
    return (f"LLaMA {llama['equal']} tensors equal + {llama['inv_freq_reported']} rotary inv_freq reported; EVA {eva['equal']} equal + {len(eva['interpolated'])} interpolated "
            f"(pos_embed) + {eva['ignored']} ignored (blocks {eva['ignored_blocks']}); stage-3 {s3['equal']} equal "
            f"(llama_proj + frozen q,v adapter '{(s3['adapter'] or {}).get('name')}'), {s3['inv_freq_reported']} "
            f"rotary inv_freq reported (equal to transformers' recomputed buffer); differing: "
            f"{len(llama['different']) + len(eva['different']) + len(s3['different'])}; "
            f"all matched or reported: {keys['all_matched_or_reported']}")


def report(summary: dict) -> None:
    files = summary["files"]
    print(f"files ({'tiny' if summary['tiny'] else 'full size'}): {LLAMA_DIR} {files['llama_bytes'] / 1e9:.2f} GB in "
          f"{files['llama_shards']} shards ({files['llama_tensors']} tensors), {EVA_FILE} {files['eva_bytes'] / 1e9:.2f} GB, "
          f"{STAGE3_FILE} {files['stage3_bytes'] / 1e6:.0f} MB; tokenizer: {files['tokenizer']}; written in {files['write_s']:.0f} s")
    for entry in ("train", "demo"):
        r = summary[entry]
        if "load_s" not in r:
            print(f"{entry}: {r}")
            continue
        print(f"{entry} load ({r['dtype']}): {r['load_s']:.1f} s; peak RssAnon {r['peak_rss_anon_gib']:.2f} GiB = "
              f"{r['ratio']:.2f} × bf16 weights {r['bf16_weights_gib']:.2f} GiB (target ≤ {TARGET_RATIO}; "
              f"{r['start_rss_anon_gib']:.2f} GiB before loading); "
              f"peak RssFile {r['peak_rss_file_gib']:.2f} GiB; VmHWM {r['vm_hwm_gib']:.2f} GiB; "
              f"ru_maxrss {r['ru_maxrss_gib']:.2f} GiB")
        print(f"  keys: {_keys_line(r['keys'])} (checked in {r['verify_s']:.0f} s)")
    r = summary.get("step")
    if r is not None:
        if "losses" not in r:
            print(f"step: {r}")
        else:
            print(f"step ({r['llama']} LLaMA, {r['eva']} EVA, fp32, train.py): loss {r['losses']}, finite {r['loss_finite']}; "
                  f"{r['step_s']:.1f} s with load; peak RssAnon {r['peak_rss_anon_gib']:.2f} GiB; "
                  f"gradients on exactly the trainable q,k LoRA + llama_proj: {r['grads_exact']} ({len(r['grads'] or [])} tensors, "
                  f"finite {r['grads_finite']}); active adapters {r['active_adapters']}; "
                  f"frozen stage-3 q,v adapter active: {r['frozen_qv_adapter_active']}")


SECTION_INTRO = (
    "`benchmarks/full_size_load.py DIR` writes the three weight files at their real shapes and dtypes with (cheap, "
    "tiled) random values — `Llama-2-7b-chat-hf/` (the release's `config.json` and `generation_config.json` fields, "
    "fp16 safetensors shards + `model.safetensors.index.json` with the 32 `rotary_emb.inv_freq` buffers the release "
    "holds, the real LLaMA-2 `tokenizer.model`), `eva_vit_g.pth` (LAVIS layout, 40 blocks, 16×16 position grid, fp16) "
    "and a MiniGPT-v2 stage-3 `checkpoint_stage3.pth` (`{\"model\": …}`, peft-0.2 q,v LoRA r 64, `llama_proj`, 32 "
    "`inv_freq` buffers) — then loads them in a fresh process per entry point exactly as `train.py --cfg-path "
    "train_configs/stage1_pancreas_detection.yaml` (`check_weight_files` + `build_model`, `init_from` = the stage-3 "
    "file) and `demo.py --cfg-path eval_configs/demo.yaml` (`load_service`, `model.ckpt` = the stage-3 file) do, "
    "with `model.dtype=bf16` (what `auto` gives on a GPU) on the CPU. Memory is sampled every 20 ms from "
    "`/proc/self/status`: RssAnon (anonymous: what must fit), RssFile (pages mapped from the weight files and "
    "libraries, which the kernel can drop) and `ru_maxrss` (their sum at its peak)."
)


def _load_row(label: str, r: dict) -> str:
    return (f"| {label} | {r['load_s']:.1f} s | {r['peak_rss_anon_gib']:.2f} GiB | {r['ratio']:.2f} | "
            f"{r['peak_rss_file_gib']:.2f} GiB | {r['ru_maxrss_gib']:.2f} GiB |")


def markdown_section(summary: dict, notes: str = "") -> str:
    """BENCHMARKS.md's section from the ``--json`` output (``notes``: hand-written paragraphs after the table;
    ``summary["earlier_runs"]`` rows are added when present)."""
    files, train, step = summary["files"], summary["train"], summary["step"]
    weights = train["bf16_weights_gib"]
    lines = ["## Full-size loading from real-format files (CPU)", "", SECTION_INTRO + (
        f" Files: LLaMA {files['llama_bytes'] / 1e9:.2f} GB in {files['llama_shards']} shards, EVA "
        f"{files['eva_bytes'] / 1e9:.2f} GB, stage-3 {files['stage3_bytes'] / 1e6:.0f} MB. Reference: the bf16 size "
        f"of the LLaMA and EVA weights, {weights:.2f} GiB; target ≤ {TARGET_RATIO} × = {TARGET_RATIO * weights:.2f} GiB."),
        "", "| load | wall time | peak RssAnon | × bf16 weights | peak RssFile | ru_maxrss |",
        "|---|---:|---:|---:|---:|---:|", _load_row("`train.py`", train), _load_row("`demo.py`", summary["demo"])]
    earlier = summary.get("earlier_runs", {})
    if "train_before_change" in earlier:
        lines.append(_load_row("`train.py`, before the meta-device ViT (commit fe2453b)", earlier["train_before_change"]))
    if "train_repeat" in earlier:
        lines.append(_load_row("`train.py`, same files and load as the row above, after the change", earlier["train_repeat"]))
    keys = train["keys"]
    llama, eva, s3 = keys["llama"], keys["eva"], keys["stage3"]
    differing = len(llama["different"]) + len(eva["different"]) + len(s3["different"])
    lines += ["", notes.strip(), "", (
        f"Every key is accounted for in both loads (all matched or reported: {keys['all_matched_or_reported']} / "
        f"{summary['demo']['keys']['all_matched_or_reported']}): LLaMA {llama['equal']} tensors equal to the file "
        f"(after fp16 → bf16) + {llama['inv_freq_reported']} `inv_freq` buffers reported (equal to the buffer "
        f"transformers recomputes); EVA {eva['equal']} tensors equal + `pos_embed` interpolated (equal to the bicubic "
        f"resize) + {eva['ignored']} tensors of block(s) {eva['ignored_blocks']} ignored (BLIP-2 uses "
        f"{eva['ignored_blocks'][0] if eva['ignored_blocks'] else '?'} blocks); stage-3 {s3['equal']} tensors equal "
        f"(`llama_proj` + the frozen q,v adapter `{(s3['adapter'] or {}).get('name')}`, active) + "
        f"{s3['inv_freq_reported']} `inv_freq` reported; {differing} differing, "
        f"{len(llama['not_in_file']) + len(eva['not_in_file'])} model tensors missing from the files."),
        "", (
        f"Training step of the full-width, reduced-depth model (LLaMA {step['llama']}, from the same shards through a "
        f"2-layer config and index; EVA {step['eva']} from the same `eva_vit_g.pth`; a 2-layer stage-3 file with the "
        f"full file's tensors) in fp32 on the CPU through `train.py`'s `main` (batch 1, phantom CT slice): loss "
        f"**{step['losses'][0]:.3f}** (finite: {step['loss_finite']}; ln 32000 = 10.37 for a uniform guess), "
        f"{step['step_s']:.1f} s including the load, peak RssAnon {step['peak_rss_anon_gib']:.2f} GiB; gradients on "
        f"exactly the {len(step['grads'])} trainable tensors (q,k LoRA A/B of the fresh adapter + `llama_proj` weight "
        f"and bias): {step['grads_exact']}, all finite: {step['grads_finite']}; active adapters "
        f"{', '.join(f'`{a}`' for a in step['active_adapters'])} (frozen stage-3 q,v adapter active: "
        f"{step['frozen_qv_adapter_active']})."),
    ]
    measured = summary.get("measured")
    if measured:
        versions = ", ".join(f"{k} {v}" for k, v in measured["versions"].items())
        lines += ["", f"Measured {measured['date']} at commit {measured['commit']} ({versions}); figures in "
                      f"`benchmarks/results/full_size_load.json`. Command: `{measured['command']}` (≈ 16 GB of disk, "
                      "≈ 8 minutes; a watchdog kills a load whose RssAnon passes `--abort-gib`, default 21; delete the "
                      "folder afterwards). `tests/test_full_size_load.py` runs the same script with `--tiny`."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="folder for the weight files (created; ≈ 16 GB at full size)")
    parser.add_argument("--tiny", action="store_true", help="tests/tiny.py widths: the same code path in seconds")
    parser.add_argument("--reuse", action="store_true", help="keep the files already in DIR (no rewrite)")
    parser.add_argument("--no-step", action="store_true", help="skip the training step")
    parser.add_argument("--in-process", action="store_true",
                        help="run the phases in this process (tests: no per-phase memory figures, no watchdog)")
    parser.add_argument("--abort-gib", type=float, default=21.0, help="kill a phase whose RssAnon passes this (GiB)")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--markdown", action="store_true",
                        help="print BENCHMARKS.md's section from DIR = a --json file (benchmarks/results/full_size_load.json)")
    parser.add_argument("--phase", choices=["train", "demo", "step"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.markdown:
        summary = json.loads(Path(args.dir).read_text())
        print(markdown_section(summary, summary.get("notes", "")), end="")
        return 0
    folder, sizes = Path(args.dir).resolve(), TINY if args.tiny else FULL
    torch.set_num_threads(min(torch.get_num_threads(), 2))

    if args.phase:  # a child: one measurement, its JSON to --result
        import logging

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        result = phase_step(folder, sizes) if args.phase == "step" else phase_load(args.phase, folder, sizes)
        Path(args.result).write_text(to_json(result, indent=2, default=str))
        return 0

    folder.mkdir(parents=True, exist_ok=True)
    summary_file = folder / "files.json"
    if args.reuse and summary_file.is_file():
        files = json.loads(summary_file.read_text())
    else:
        files = write_files(folder, sizes, args.tiny)
        summary_file.write_text(to_json(files))
    summary = {"tiny": args.tiny, "sizes": asdict(sizes), "files": files}
    for phase in ("train", "demo") + (() if args.no_step else ("step",)):
        if args.in_process:
            summary[phase] = phase_step(folder, sizes) if phase == "step" else phase_load(phase, folder, sizes)
        else:
            summary[phase] = run_phase(phase, folder, args.tiny, args.abort_gib)
    report(summary)
    if args.json:
        from minigpt4.io import write_json_atomic

        write_json_atomic(args.json, summary)
    loads_ok = all(summary[e].get("keys", {}).get("all_matched_or_reported") for e in ("train", "demo"))
    step_ok = args.no_step or (summary["step"].get("loss_finite") and summary["step"].get("grads_exact"))
    return 0 if loads_ok and step_ok else 1


if __name__ == "__main__":
    sys.exit(main())
