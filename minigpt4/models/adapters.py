"""The LoRA adapter stack of :class:`~minigpt4.models.minigpt_v2.MiniGPTPancreas`.

Adapters form a stack on one never-modified base (peft runs several active adapters): the
trainable adapter (``default``, ``model.lora``) plus any number of frozen named adapters, e.g.
MiniGPT-v2's stage-3 q,v LoRA under a q,k configuration. Call these methods rather than peft's
own, which mark adapters trainable.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Iterator, Optional, Sequence

import torch
from peft import LoraConfig as PeftLoraConfig

from minigpt4.models.lora_names import split_lora_tensors, stable_name

_ADAPTER_PARAM_RE = re.compile(r"\.lora_[AB]\.(?P<adapter>[^.]+)\.weight$")
_ADAPTER_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class LoraAdapterStack:
    """Adapter-stack methods of :class:`~minigpt4.models.minigpt_v2.MiniGPTPancreas` (a mixin).

    The model provides ``llama_model`` (the peft model), ``llama``, ``cfg``, ``train()`` and the
    stack's state, set in its constructor: ``_adapters`` (name → :meth:`adapter_stack` entry, in
    stack order) and ``_trainable_adapter`` (the name of the adapter that is trained).
    """

    def adapter_stack(self) -> list[dict]:
        """The LoRA adapters on the base, in the order they were added (the trainable one first).

        Returns:
            One dict per adapter: ``name``, ``targets`` (sorted short module names, e.g.
            ``['q_proj', 'v_proj']``), ``r``, ``alpha``, ``source`` (file it came from, or None),
            ``sha256`` (of that file, or None), ``trainable`` (bool), ``active`` (bool).
        """
        active = set(self.active_adapters())
        return [dict(entry, active=name in active) for name, entry in self._adapters.items()]

    def active_adapters(self) -> list[str]:
        """Names of the adapters that take part in the forward pass."""
        names = self.llama_model.base_model.active_adapter
        return [names] if isinstance(names, str) else list(names)

    def add_lora_adapter(
        self,
        name: str,
        tensors: dict[str, torch.Tensor],
        alpha: float,
        r: Optional[int] = None,
        targets: Optional[Sequence[str]] = None,
        trainable: bool = False,
        source: Optional[str] = None,
        sha256: Optional[str] = None,
        active: bool = True,
    ) -> dict:
        """Stack a LoRA adapter with the given weights on the (unchanged) base.

        The adapter computes ``W x + B A x · alpha / r`` on each of its modules, with fp32
        factors, and no dropout when frozen. It is active unless ``active=False``.

        Args:
            name: a new adapter name (letters, digits, ``_``), e.g. ``'stage3'``.
            tensors: ``{peft-0.2 name: tensor}``, i.e.
                ``llama_model.base_model.model.model.layers.{i}.self_attn.v_proj.lora_{A,B}.weight``
                (A (r, in), B (out, r)); every targeted module needs both factors.
            alpha: LoRA alpha (MiniGPT-v2's stage 3: 16).
            r: rank; default read from the shapes (checked against them when given).
            targets: short module names; default those of ``tensors`` (checked when given).
            trainable: make this the adapter that is trained (its tensors become
                :meth:`trainable_state_dict`); the previous trainable adapter is frozen and stays active.
            source, sha256: provenance recorded in :meth:`adapter_stack` and in checkpoints.
            active: take part in the forward pass right away.
        Returns:
            The new :meth:`adapter_stack` entry.
        Raises:
            ValueError: bad name, a module missing in this LLaMA, a missing factor, shapes that
                do not fit the weight or disagree with ``r``/``targets``.
        """
        where = source or "adapter"
        if not _ADAPTER_NAME_RE.match(name) or name in self._adapters:
            raise ValueError(f"{where}: adapter name {name!r} is invalid or already used ({sorted(self._adapters)})")
        lora, rest = split_lora_tensors(tensors)
        if rest or not lora:
            got = sorted(rest)[:3] or "nothing"
            raise ValueError(f"{where}: expected only LoRA factors in peft-0.2 names, got e.g. {got}")
        ranks = set()
        for module_path, pair in sorted(lora.items()):
            if set(pair) != {"A", "B"}:
                raise ValueError(f"{where}: LoRA of {module_path} has only lora_{''.join(pair)}")
            try:
                layer = self.llama.get_submodule(module_path)
            except AttributeError:
                raise ValueError(f"{where}: LoRA module {module_path} does not exist in this LLaMA") from None
            base = getattr(layer, "base_layer", layer)
            A, B = pair["A"], pair["B"]
            fits = A.ndim == B.ndim == 2 and B.shape[1] == A.shape[0]
            if not fits or (B.shape[0], A.shape[1]) != (base.out_features, base.in_features):
                raise ValueError(
                    f"{where}: LoRA of {module_path} has A {tuple(A.shape)}, B {tuple(B.shape)} which do not "
                    f"fit the weight ({base.out_features}, {base.in_features})"
                )
            ranks.add(A.shape[0])
        found = sorted({m.rsplit(".", 1)[-1] for m in lora})
        if len(ranks) != 1 or (r is not None and ranks != {r}):
            raise ValueError(f"{where}: LoRA ranks {sorted(ranks)} (expected one rank{'' if r is None else f', {r}'})")
        if targets is not None and sorted(targets) != found:
            raise ValueError(f"{where}: LoRA targets {found} in the tensors, but {sorted(targets)} declared")
        config = PeftLoraConfig(
            r=ranks.pop(), lora_alpha=float(alpha), lora_dropout=self.cfg.lora.dropout if trainable else 0.0,
            bias="none", task_type="CAUSAL_LM",
            target_modules=sorted(lora),  # exact module paths: only the modules the tensors cover
        )
        active_before = self.active_adapters()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.llama_model.add_adapter(name, config)
        with torch.no_grad():
            for module_path, pair in lora.items():
                layer = self.llama.get_submodule(module_path)
                for ab, factors in (("A", layer.lora_A), ("B", layer.lora_B)):
                    # fp32 factors on any base (older peft casts new adapters to a bf16 base's dtype)
                    factors[name].to(torch.float32)
                    weight = factors[name].weight
                    weight.copy_(pair[ab].to(weight.device, weight.dtype))
        self._adapters[name] = {
            "name": name, "targets": found, "r": config.r, "alpha": float(alpha),
            "source": source, "sha256": sha256, "trainable": False,
        }
        if trainable:
            self._adapters[self._trainable_adapter]["trainable"] = False
            self._adapters[name]["trainable"] = True
            self._trainable_adapter = name
        self.set_active_adapters(active_before + [name] if active else active_before)
        return dict(self._adapters[name], active=active)

    def set_active_adapters(self, names: Sequence[str]) -> None:
        """Make exactly ``names`` take part in the forward pass (their deltas add up).

        Freezing does not depend on this: only the trainable adapter ever requires grad (peft's
        ``set_adapter`` marks every active adapter trainable; that is undone here).
        """
        names = list(names)
        unknown = [n for n in names if n not in self._adapters]
        if unknown or not names:
            raise ValueError(f"unknown adapters {unknown} (known: {list(self._adapters)})" if unknown else "no adapters")
        self.llama_model.base_model.set_adapter(names)
        self._refreeze_adapters()
        self.train(self.training)

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Run the bare base inside the block (peft's ``disable_adapter``), re-frozen afterwards:
        peft leaves every active adapter trainable when the block ends."""
        try:
            with self.llama_model.disable_adapter():
                yield
        finally:
            self._refreeze_adapters()

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """``{peft-0.2 name: tensor}`` of adapter ``name`` (detached, same storage)."""
        if name not in self._adapters:
            raise ValueError(f"unknown adapter {name!r} (known: {list(self._adapters)})")
        out = {}
        for param_name, p in self.llama_model.named_parameters(prefix="llama_model"):
            match = _ADAPTER_PARAM_RE.search(param_name)
            if match and match["adapter"] == name:
                out[stable_name(param_name, name)] = p.detach()
        return out

    def _refreeze_adapters(self) -> None:
        # peft's add_adapter / set_adapter / disable_adapter flip requires_grad of adapters;
        # the rule here is by name only: the trainable adapter's factors, nothing else of the LLaMA
        for param_name, p in self.llama_model.named_parameters():
            match = _ADAPTER_PARAM_RE.search(param_name)
            p.requires_grad_(bool(match) and match["adapter"] == self._trainable_adapter)
