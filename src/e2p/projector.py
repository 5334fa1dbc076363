"""Projector: a user embedding -> k prefix vectors for a frozen backbone (or k shared vectors)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .config import E2PConfig, resolve_projector
from .errors import BackboneMismatchError, ConfigError, EmbeddingError

WEIGHTS_NAME = "model.safetensors"
ADAPTER_DIR = "adapter"  # the shared LoRA adapter, in PEFT's folder format, beside the projector's own weights


SET_KEY_DIM = 64  # the attention pooling's query / key size (a set profile)


class Projector(nn.Module):
    """prefix = shared + s * (MLP(x) - MLP(0)), x the centered, normalized embedding, reshaped to (k, prefix_dim).

    `shared` holds what every user has in common (the data set's style); the MLP's last layer
    starts at zero so a projector initialised from a trained shared prefix starts exactly there
    and learns only what differs between people. s (config.person_scale, 1 while training) is set
    afterwards on validation people: a person part fitted on a few thousand people is over-confident
    about new ones, and shrinking it toward the shared prefix is the cheapest cure.
    With config.embedding_slots = N > 1 the embedding is N blocks (one per persona sentence) and block j gives
    prefix token j through the same MLP, so every fact keeps a token of its own for attention to pick.
    With config.lora_rank = r > 0 the projector also carries `lora`, one LoRA adapter of the backbone shared by every
    user (e2p.lora.Adapter, trained with it; E2PModel applies it), so per-user storage stays one embedding.
    """

    def __init__(self, config: E2PConfig):
        super().__init__()
        if config.prefix_dim <= 0:
            raise ConfigError("config lacks the backbone's sizes: build it with e2p.model.new_config(backbone, ...) or set backbone_hidden_size")
        self.config = config
        k, d = config.num_prefix_tokens, config.prefix_dim
        self.shared = nn.Parameter(torch.randn(k, d) * 0.02)
        self.register_buffer(
            "embedding_mean",
            torch.tensor(config.embedding_mean, dtype=torch.float32) if config.embedding_mean else torch.zeros(config.slot_dim),
        )
        if config.is_shared:
            self.mlp = None
        else:
            layers: list[nn.Module] = []
            width = config.slot_dim
            for h in config.hidden_dims:
                layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(config.dropout)]
                width = h
            per_token = config.embedding_slots > 1 or config.set_items  # one token per slot / per pooled query
            last = nn.Linear(width, d if per_token else k * d)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            layers.append(last)
            self.mlp = nn.Sequential(*layers)
        if config.set_items and not config.is_shared:  # attention pooling of the items with k learned queries
            self.set_queries = nn.Parameter(torch.randn(k, SET_KEY_DIM) * 0.02)
            self.set_keys = nn.Linear(config.slot_dim, SET_KEY_DIM)
        self.lora = None  # created last, so the other initial weights are those of a projector without one
        if config.lora_rank:
            from .lora import Adapter

            self.lora = Adapter(config.lora_modules, config.lora_rank, config.lora_alpha)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Raise EmbeddingError on a wrong size or non-finite values; return float32 [B, E]."""
        e = torch.as_tensor(embeddings, dtype=torch.float32)
        if e.dim() == 1:
            e = e.unsqueeze(0)
        if e.dim() != 2 or e.shape[-1] != self.config.embedding_dim:
            raise EmbeddingError(
                f"expected embeddings of size {self.config.embedding_dim} (encoder {self.config.encoder_name or 'unknown'}), "
                f"got shape {tuple(e.shape)}: embed users with the same encoder the projector was trained with"
                + (f" (one vector per sentence in {self.config.embedding_slots} slots: "
                   f"e2p.data.encoders.SentenceSlotEncoder(encoder, {self.config.embedding_slots}))" if self.config.embedding_slots > 1 else "")
            )
        if not torch.isfinite(e).all():
            raise EmbeddingError("embeddings contain NaN or inf values: recompute them before use")
        return e

    def forward(self, embeddings: torch.Tensor | None = None, batch_size: int | None = None) -> torch.Tensor:
        """[B, E] embeddings (or batch_size for a shared prefix) -> [B, k, prefix_dim]."""
        k, d = self.config.num_prefix_tokens, self.config.prefix_dim
        if self.config.is_shared:
            if batch_size is None:
                batch_size = 1 if embeddings is None else len(embeddings)
            out = self.shared.unsqueeze(0).expand(batch_size, k, d)
        else:
            if embeddings is None:
                raise EmbeddingError("this projector needs a user embedding; use a shared prefix for users without one")
            e = self.check_embeddings(embeddings).to(self.shared.device)
            if self.config.set_items:
                return self._normed(self._from_set(e))
            blocks = e.view(-1, self.config.slot_dim)  # [B * slots, slot_dim]
            e = unit_rows(blocks - self.embedding_mean)
            person = self._person(e)
            if self.config.embedding_slots > 1:  # and for an unused (all-zero) slot
                person = person * used_slots(blocks).unsqueeze(-1)
            out = self.shared.unsqueeze(0) + self.config.person_scale * person.view(-1, k, d)
        return self._normed(out)

    def pool(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N * D] item sets -> ([B, k, D] pooled items, [B, k, N] attention weights): query j's softmax over the
        user's items (empty, all-zero items masked; a user with none pools to zero, the average person)."""
        B, N, D = len(e), self.config.set_items, self.config.slot_dim
        items = e.view(B, N, D)
        used = used_slots(items.reshape(B * N, D)).view(B, N).bool()
        x = unit_rows((items - self.embedding_mean).reshape(B * N, D)).view(B, N, D) * used.unsqueeze(-1)
        scores = torch.einsum("kh,bnh->bkn", self.set_queries, self.set_keys(x)) / SET_KEY_DIM ** 0.5
        scores = scores.masked_fill(~used.unsqueeze(1), float("-inf"))
        weights = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)  # no items: all weights 0
        return torch.einsum("bkn,bnd->bkd", weights, x), weights

    def _from_set(self, e: torch.Tensor) -> torch.Tensor:
        """shared + s * (MLP(pooled_j) - MLP(0)) for each query j: prefix token j reads what query j picked."""
        k, d = self.config.num_prefix_tokens, self.config.prefix_dim
        pooled, _ = self.pool(e)
        person = self._person(pooled.reshape(-1, pooled.shape[-1])).view(-1, k, d)
        return self.shared.unsqueeze(0) + self.config.person_scale * person

    def _person(self, x: torch.Tensor) -> torch.Tensor:
        """MLP(x) - MLP(0) per row: the person part is zero for the average person, so style stays in `shared`."""
        person = self.mlp(torch.cat([x, torch.zeros_like(x[:1])]))
        return person[:-1] - person[-1:]

    def _normed(self, out: torch.Tensor) -> torch.Tensor:
        if self.config.output_norm and self.config.injection == "input":
            out = out / out.norm(dim=-1, keepdim=True).clamp_min(1e-6) * self.config.token_embedding_norm
        return out

    # --- Hugging Face style persistence -------------------------------------------------------
    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> None:
        """config.json + model.safetensors; `dtype=torch.float16` halves the file (loads back as float32). A shared
        LoRA adapter goes beside them in `adapter/`, in PEFT's format (`PeftModel.from_pretrained` reads it)."""
        import shutil

        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory)
        from .lora import PEFT_CONFIG, save_peft

        adapter = directory / ADAPTER_DIR
        if self.lora is not None:  # written whole beside, then moved in: never a half-written adapter
            tmp = directory / (ADAPTER_DIR + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            save_peft(self.lora, tmp, base_model=self.config.backbone_name)
            shutil.rmtree(adapter, ignore_errors=True)
            tmp.replace(adapter)
        elif (adapter / PEFT_CONFIG).is_file():
            shutil.rmtree(adapter)  # an earlier save's adapter is not this projector's
        state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in self.state_dict().items()
                 if not k.startswith("lora.")}
        tmp = directory / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt", "e2p": "projector"})
        tmp.replace(directory / WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | Path, backbone=None) -> "Projector":
        """Load config.json + model.safetensors; with `backbone`, refuse one it was not trained for."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = resolve_projector(directory)
        config = E2PConfig.load(directory)
        if backbone is not None:
            check_backbone(config, backbone)
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise ConfigError(f"no {WEIGHTS_NAME} in {directory}: the save was interrupted; retrain or restore it")
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConfigError(f"{weights} is corrupt ({exc}); retrain or restore the projector") from exc
        projector = cls(config)
        adapter = directory / ADAPTER_DIR
        if adapter.is_dir():  # the shared adapter beside (older projectors kept it in model.safetensors: read as well)
            if projector.lora is None:
                raise ConfigError(f"{adapter} is a LoRA adapter but {directory / 'config.json'} has none (lora_rank 0): "
                                  "restore the projector's config.json, or remove the stray folder")
            from .lora import load_peft

            try:
                state.update({f"lora.{k}": v for k, v in load_peft(adapter).state_dict().items()})
            except (SafetensorError, OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
                raise ConfigError(f"{adapter} is corrupt ({exc}); retrain or restore the projector") from exc
        try:
            projector.load_state_dict(state)
        except RuntimeError as exc:
            raise ConfigError(f"{weights} does not match its config.json ({exc}); retrain or restore the projector") from exc
        return projector


def check_backbone(config: E2PConfig, backbone) -> None:
    """A projector only makes sense on the backbone (sizes) it was trained for."""
    problems = []
    if config.backbone_hidden_size != backbone.hidden_size:
        problems.append(f"hidden size {config.backbone_hidden_size} vs {backbone.hidden_size}")
    if config.injection == "deep" and (config.backbone_num_layers, config.backbone_kv_dim) != (backbone.num_layers, backbone.kv_dim):
        problems.append(f"layers x kv {config.backbone_num_layers}x{config.backbone_kv_dim} vs {backbone.num_layers}x{backbone.kv_dim}")
    if config.lora_rank:
        from .lora import module_problems

        found = module_problems(backbone.model, config.lora_modules)
        problems += found[:3] + ([f"{len(found) - 3} more LoRA layers"] if len(found) > 3 else [])
    if problems:
        raise BackboneMismatchError(
            f"projector was trained for backbone {config.backbone_name!r} but got {backbone.name!r} ({'; '.join(problems)}): "
            f"load it with --backbone {config.backbone_name}"
        )


def parameter_summary(projector: Projector) -> str:
    n = projector.num_parameters()
    text = f"{n:,} parameters ({n * 4 / 2**20:.2f} MiB float32)"
    if projector.lora is not None:
        text += f", of which the shared {projector.lora.describe()}"
    return text


def adapter_cost(projector: Projector | None) -> dict:
    """The shared LoRA adapter's size (one for every user, not stored per user); zeros without one."""
    lora = getattr(projector, "lora", None)
    if lora is None:
        return {"adapter_parameters": 0, "adapter_bytes": 0}
    n = lora.num_parameters()
    return {"adapter_parameters": n, "adapter_bytes": n * 4, "adapter": lora.describe()}


def unit_rows(e: torch.Tensor) -> torch.Tensor:
    """[N, D] -> each row divided by its norm (at least 1e-6). A finite row with values from about 1e18 up has a
    float32 norm that overflows to inf, which would make its person part zero (silently the shared prefix): such a
    row is first divided by its largest absolute value, so it behaves like its direction. Rows whose norm is
    finite are computed exactly as before, bit for bit (no branch: no host sync on a GPU)."""
    norm = e.norm(dim=-1, keepdim=True)
    huge = ~torch.isfinite(norm)
    peak = torch.where(huge, e.abs().amax(-1, keepdim=True), torch.ones_like(norm))
    e = torch.where(huge, e / peak, e)
    norm = torch.where(huge, e.norm(dim=-1, keepdim=True), norm)
    return e / norm.clamp_min(1e-6)


def used_slots(blocks: torch.Tensor) -> torch.Tensor:
    """[N, slot_dim] -> [N] bool: the slot holds a sentence (SentenceSlotEncoder leaves unused slots all zero)."""
    return blocks.abs().sum(-1) > 0


def embedding_center(table: torch.Tensor, slots: int = 1) -> torch.Tensor:
    """The mean a projector subtracts from its inputs: over users, or with slots over every used slot."""
    if slots == 1:
        return table.mean(0)
    blocks = table.reshape(-1, table.shape[-1] // slots)
    return blocks[used_slots(blocks)].mean(0)
