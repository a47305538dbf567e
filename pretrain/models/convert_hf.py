"""Hugging Face transformers ViT folders, both ways: config.json, model.safetensors, preprocessor_config.json.

transformers 5 renames ViT's parameters in memory (``layers.N.attention.q_proj``, ...), but
``save_pretrained`` writes and ``from_pretrained`` reads the classic names
(``encoder.layer.N.attention.attention.query``); files written here carry the classic names and
reading accepts both. transformers is not imported: the files are plain JSON and safetensors.

What HF can hold: ``ViTForImageClassification`` is our fine-tuning model (pool 'cls', head
'linear'); ``ViTModel`` is the encoder, and its pooler (dense + tanh on the first token) is exactly
our pre-logits. Neither holds a pre-logits layer and a classifier together, average pooling, or the
ResNet hybrid (transformers 5 dropped ``ViTHybrid``).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from pathlib import Path

import torch

from ..data.transforms import eval_resize
from ..errors import UserError
from ..weights_file import save_weights
from .convert_timm import load_into, model_name, read_weights_file
from .vit import PatchEmbed, Size, VisionTransformer

log = logging.getLogger(__name__)

# Ours: HF's saved name, inside the encoder (which carries the "vit." prefix in task models).
_ENCODER = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
    "pre_logits.fc.weight": "pooler.dense.weight",
    "pre_logits.fc.bias": "pooler.dense.bias",
}
_CLASSIFIER = {"head.weight": "classifier.weight", "head.bias": "classifier.bias"}
# Ours after "blocks.N.": HF's classic name after "encoder.layer.N.", HF's in-memory name after "layers.N.".
_BLOCK = {
    "norm1": ("layernorm_before", "layernorm_before"),
    "attn.proj": ("attention.output.dense", "attention.o_proj"),
    "norm2": ("layernorm_after", "layernorm_after"),
    "mlp.fc1": ("intermediate.dense", "mlp.fc1"),
    "mlp.fc2": ("output.dense", "mlp.fc2"),
}
_QKV = (("attention.attention.query", "attention.q_proj"), ("attention.attention.key", "attention.k_proj"),
        ("attention.attention.value", "attention.v_proj"))

# ViTConfig's defaults, for config.json files that leave a field out.
_CONFIG_DEFAULTS = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "hidden_act": "gelu", "layer_norm_eps": 1e-12, "image_size": 224, "patch_size": 16, "num_channels": 3,
    "qkv_bias": True, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "pooler_act": "tanh",
}


def to_hf(model: VisionTransformer, folder: str | Path, id2label: dict[int, str] | None = None,
          multi_label: bool = False) -> Path:
    """Write ``model`` as a transformers folder that ``from_pretrained`` loads; returns the folder.

    A fine-tuned model (head 'linear') becomes ``ViTForImageClassification`` labelled by
    ``id2label`` (default 'LABEL_i'); ``multi_label`` (trained with a sigmoid loss) tells transformers
    so, and then its pipeline scores each class by a sigmoid and its fine-tuning uses BCE, not softmax.
    A pre-training model (head 'prelogits') becomes ``ViTModel`` with its pre-logits as the pooler, so
    ``pooler_output`` is our ``representation()``; its classifier has no place in HF and is left out, with a
    warning. A head 'linear' model without classes also becomes ``ViTModel``, whose pooler transformers then
    initialises at random.
    """
    _check_exportable(model)
    classifier = model.head_type == "linear" and model.num_classes > 0
    if model.head_type == "prelogits" and model.num_classes:
        log.warning("%s: HF's ViTModel has no classifier after its pooler; the %d-class head is not exported "
                    "(for its predictions export --format onnx, or fine-tune first)", folder, model.num_classes)
    ours = model.state_dict()
    prefix = "vit." if classifier else ""
    tensors = {}
    for mine, hf, part in _hf_names(model.size.depth):
        if mine not in ours or (mine.startswith("head.") and not classifier):
            continue
        tensor = ours[mine] if part is None else ours[mine].chunk(3)[part]
        hf_name = hf if hf.startswith("classifier.") else prefix + hf
        tensors[hf_name] = tensor.detach().to("cpu", copy=True).contiguous()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = _hf_config(model, classifier, id2label, multi_label)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(model), indent=2) + "\n")
    return folder


def from_hf(folder: str | Path) -> VisionTransformer:
    """The ``VisionTransformer`` a transformers ViT folder holds, weights loaded.

    ``ViTForImageClassification`` gives head 'linear' with the classifier's classes; ``ViTModel``
    with a pooler gives head 'prelogits' without a classifier; without either, head 'linear' and no
    classifier (the model returns the final [CLS] token).
    """
    config, state = read_hf(folder)
    size = Size(config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
                config["intermediate_size"])
    model = VisionTransformer(
        size,
        PatchEmbed(config["patch_size"], size.width),
        image_size=config["image_size"],
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
        head="prelogits" if "pre_logits.fc.weight" in state else "linear",
        dropout=config["hidden_dropout_prob"],
        attn_dropout=config["attention_probs_dropout_prob"],
        norm_eps=config["layer_norm_eps"],
    )
    load_into(model, state)
    return model


def read_hf(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A transformers ViT folder's checked config (defaults filled in) and its weights in our names."""
    folder = Path(folder)
    config = read_config(folder)
    state = hf_to_ours(_read_weights(folder))
    if "head.weight" in state:  # ViTForImageClassification reads the [CLS] token, never a pooler
        state = {k: v for k, v in state.items() if not k.startswith("pre_logits.")}
    return config, state


def is_hf(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict carries transformers ViT names."""
    return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in state_dict)


def hf_to_ours(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ViT state dict (classic or in-memory names, with or without 'vit.') in our names."""
    blocks = {int(m[1]) for k in state_dict if (m := re.match(r"(?:vit\.)?(?:encoder\.layer|layers)\.(\d+)\.", k))}
    depth = max(blocks, default=-1) + 1
    lookup = {}
    for mine, hf, part in _hf_names(depth):
        for alias in _aliases(hf):
            lookup[alias] = (mine, part)
            lookup["vit." + alias] = (mine, part)
    state, qkv, other_heads = {}, {}, set()
    wrapped = any(k.startswith("vit.") for k in state_dict)
    for key, tensor in state_dict.items():
        if key.removeprefix("vit.") == "embeddings.mask_token":
            continue  # masked image modelling's token for masked patches: no input of a classifier is masked
        if key not in lookup and wrapped and not key.startswith("vit."):
            other_heads.add(key.split(".")[0])  # beside the encoder 'vit': SimMIM's decoder, ...
            continue
        if key not in lookup:
            raise UserError(f"the transformers state dict has {key}, which a plain ViT does not have")
        mine, part = lookup[key]
        if part is None:
            state[mine] = tensor
        else:
            qkv.setdefault(mine, [None] * 3)[part] = tensor
    for mine, parts in qkv.items():
        if any(p is None for p in parts):
            raise UserError(f"the transformers state dict has only some of query, key and value for {mine}")
        state[mine] = torch.cat(parts)
    if other_heads:
        log.warning("the transformers weights' %s (another task's head) are left out: the encoder 'vit' is read",
                    ", ".join(sorted(other_heads)))
    return state


def _hf_names(depth: int) -> list[tuple[str, str, int | None]]:
    """(our name, HF's classic name without 'vit.', which third of our fused qkv it is or None)."""
    names = [(mine, hf, None) for mine, hf in (_ENCODER | _CLASSIFIER).items()]
    for i, p in itertools.product(range(depth), ("weight", "bias")):
        names += [(f"blocks.{i}.{mine}.{p}", f"encoder.layer.{i}.{hf}.{p}", None) for mine, (hf, _) in _BLOCK.items()]
        names += [(f"blocks.{i}.attn.qkv.{p}", f"encoder.layer.{i}.{hf}.{p}", n) for n, (hf, _) in enumerate(_QKV)]
    return names


def _aliases(classic: str) -> tuple[str, ...]:
    """A classic HF name and its transformers 5 in-memory spelling."""
    m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", classic)
    if not m:
        return (classic,)
    renamed = dict(_BLOCK.values()) | dict(_QKV)
    return classic, f"layers.{m[1]}.{renamed[m[2]]}.{m[3]}"


def _check_exportable(model: VisionTransformer) -> None:
    if not isinstance(model.patch_embed, PatchEmbed):
        raise UserError(f"{model_name(model)} is a ResNet hybrid, which transformers 5 no longer has (ViTHybrid "
                        "was removed); export it to ONNX, or load its state dict into a timm hybrid of the same size "
                        "(for R50 + ViT-B/16, vit_base_r50_s16_*)")
    if model.pool != "cls":
        raise UserError(f"{model_name(model)} averages its tokens (pool 'gap'), but transformers' ViT reads the "
                        "[CLS] token; export it to ONNX instead")


def _hf_config(model: VisionTransformer, classifier: bool, id2label: dict[int, str] | None, multi_label: bool) -> dict:
    width, depth, heads, mlp_dim = model.size
    config = {
        "architectures": ["ViTForImageClassification" if classifier else "ViTModel"],
        "model_type": "vit",
        "hidden_size": width,
        "num_hidden_layers": depth,
        "num_attention_heads": heads,
        "intermediate_size": mlp_dim,
        "hidden_act": "gelu",
        "layer_norm_eps": model.norm_eps,
        "image_size": model.image_size,
        "patch_size": model.patch_size,
        "num_channels": model.patch_embed.in_chans,
        "qkv_bias": True,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "encoder_stride": model.patch_size,
        "pooler_act": "tanh",
        "pooler_output_size": width,
        "dtype": str(model.pos_embed.dtype).removeprefix("torch."),
    }
    if classifier:
        labels = id2label if id2label is not None else {i: f"LABEL_{i}" for i in range(model.num_classes)}
        if sorted(labels) != list(range(model.num_classes)):
            raise UserError(f"id2label has {len(labels)} entries but the model has {model.num_classes} classes; "
                            f"give one label for each class index 0..{model.num_classes - 1}")
        config["id2label"] = {str(i): labels[i] for i in range(model.num_classes)}
        config["label2id"] = {labels[i]: i for i in range(model.num_classes)}
        config["problem_type"] = "multi_label_classification" if multi_label else "single_label_classification"
    return config


def preprocessor_config(model: VisionTransformer) -> dict:
    """What ``pretrain.evaluate`` does to an image, as an image processor: the shorter side resized to size / 0.875,
    the centre crop, then [0, 1] -> mean 0.5, std 0.5. ``ViTImageProcessor`` only resizes to a square; BiT's
    processor (loaded by ``AutoImageProcessor`` and the pipelines for any model type) crops."""
    channels = model.patch_embed.in_chans
    return {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": eval_resize(model.image_size)},
        "resample": 2,  # PIL bilinear
        "do_center_crop": True,
        "crop_size": {"height": model.image_size, "width": model.image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5] * channels,
        "image_std": [0.5] * channels,
    }


def read_config(folder: Path) -> dict:
    """A transformers ViT folder's config.json, defaults filled in; what this ViT cannot represent is refused."""
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder} has no config.json; is it a transformers model folder?")
    config = {**_CONFIG_DEFAULTS, **read_json(path)}
    if config.get("model_type") != "vit":
        if "architecture" in config:
            raise UserError(f"{path} is that of a timm model folder ({config['architecture']}), not a transformers "
                            f"one (init_from reads it as timm's)")
        raise UserError(f"{path} is a '{config.get('model_type')}' model; only plain ViT ('vit') folders can be read")
    for key in ("image_size", "patch_size"):
        value = config[key]
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise UserError(f"{path} sets {key} {value}; only square images and patches can be read")
            config[key] = value[0]
    unsupported = {
        "hidden_act": config["hidden_act"] not in ("gelu", "gelu_python"),  # both exact (erf) GELU
        "qkv_bias": not config["qkv_bias"],
        "num_channels": config["num_channels"] != 3,
        "pooler_act": config["pooler_act"] != "tanh",
        "pooler_output_size": config.get("pooler_output_size", config["hidden_size"]) != config["hidden_size"],
    }
    bad = [f"{key}={config.get(key)!r}" for key, is_bad in unsupported.items() if is_bad]
    if bad:
        raise UserError(f"{path} sets {', '.join(bad)}, which this ViT cannot represent (it has exact GELU, biased "
                        "q/k/v, 3 channels and a tanh pooler as wide as the model)")
    return config


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); is it complete?") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not an object; is it a transformers file?")
    return data


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, its sharded form (model.safetensors.index.json), or pytorch_model.bin."""
    if (folder / "model.safetensors").is_file():
        return read_weights_file(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index} has no weight_map naming the shards; save the model again with save_pretrained")
        state = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise UserError(f"{folder / shard}, a shard that {index.name} names, does not exist; copy the "
                                f"whole folder")
            state.update(read_weights_file(folder / shard))
        return state
    if (folder / "pytorch_model.bin").is_file():
        return read_weights_file(folder / "pytorch_model.bin")
    raise UserError(f"{folder} has no model.safetensors or pytorch_model.bin; save the model with save_pretrained")
