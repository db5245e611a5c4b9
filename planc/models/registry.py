"""Model references: bundled names, checkpoint directories, config files and factories.

A MODEL argument is resolved in this order:
  1. a bundled name (`tiny-deepseek`, `tiny-draft`, and the full-size `deepseek-v3`, `kimi-k2`
     configs, which only make sense with `meta=True`);
  2. a directory holding a Hugging Face checkpoint (config.json + *.safetensors);
  3. a config.json file (seeded random init);
  4. `package.module:factory`, a callable returning an nn.Module. planc imports it only when the
     user names it (command line, Python API); planc.driver refuses one a plan names.

Nothing here runs code a checkpoint ships: transformers is called with trust_remote_code=False and
local files only, and weights are read from safetensors alone (never pickled *.bin files).

dtype "auto" (the plan's default) is the checkpoint's own dtype: config.json's `dtype` (or the
older `torch_dtype`), else the dtype of its safetensors tensors, else float32; for a config.json
alone (a random init, or a --meta plan of a published config), the dtype it names, else float32.
Bundled models and factories have no stored dtype: float32 (a factory's module keeps the dtype it
was built in). A checkpoint stored quantized (config.json's quantization_config) is refused; a
config.json naming one builds the unquantized model, and compile says so.
"""
from __future__ import annotations

import importlib
import json
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from planc.dims import DTYPES
from planc.errors import ModelError, one_line, read_json
from planc.lazy import lazy

torch = lazy("torch")
nn = lazy("torch.nn")
transformers = lazy("transformers")
hf_logging = lazy("transformers.utils.logging")
hf_init = lazy("transformers.initialization")


WEIGHTS_DIR = Path(__file__).parent / "weights"
INIT_SEED = 0

# safetensors' dtype names of the floating dtypes planc compiles
SAFETENSORS_DTYPES = {"F32": "float32", "F64": "float64", "BF16": "bfloat16", "F16": "float16"}
SAFETENSORS_MAX_HEADER = 100 * 2**20  # the safetensors format's own limit on its JSON header
MAX_CONFIG_BYTES = 16 * 2**20  # a config.json is a few KiB

# Byte-level vocabulary shared by the bundled models: 256 byte values, then specials.
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
BYTE_VOCAB = 260


def _tiny_deepseek() -> transformers.PretrainedConfig:
    return transformers.DeepseekV3Config(
        vocab_size=BYTE_VOCAB, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=64, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
        n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
        first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        max_position_embeddings=2048, rope_interleave=True, tie_word_embeddings=False,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )


def _tiny_draft() -> transformers.PretrainedConfig:
    return transformers.LlamaConfig(
        vocab_size=BYTE_VOCAB, hidden_size=96, intermediate_size=256, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=False, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )


def _deepseek_v3() -> transformers.PretrainedConfig:
    return transformers.DeepseekV3Config(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4, n_shared_experts=1,
        first_k_dense_replace=3, routed_scaling_factor=2.5, norm_topk_prob=True,
        max_position_embeddings=163840, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                         "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 1.0, "mscale_all_dim": 1.0},
    )


def _kimi_k2() -> transformers.PretrainedConfig:
    # Kimi-K2 is the DeepSeek-V3 architecture with 64 heads, 384 routed experts and one group.
    cfg = _deepseek_v3()
    cfg.num_attention_heads = cfg.num_key_value_heads = 64
    cfg.n_routed_experts = cfg.num_local_experts = 384
    cfg.n_group = cfg.topk_group = 1
    cfg.first_k_dense_replace = 1
    cfg.vocab_size = 163840
    cfg.routed_scaling_factor = 2.827
    return cfg


@dataclass(frozen=True)
class Bundled:
    config: Callable[[], transformers.PretrainedConfig]
    full_size: bool  # too large to materialize: meta only


BUNDLED: dict[str, Bundled] = {
    "tiny-deepseek": Bundled(_tiny_deepseek, False),
    "tiny-draft": Bundled(_tiny_draft, False),
    "deepseek-v3": Bundled(_deepseek_v3, True),
    "kimi-k2": Bundled(_kimi_k2, True),
}


def pin_static_paths(config: transformers.PretrainedConfig, dtype: torch.dtype | None = None) -> transformers.PretrainedConfig:
    """Pick code paths that export and Dynamo can capture (eager experts loop over nonzero()).

    grouped_mm has no fp64 kernel, so fp64 models (exactness checks) use batched_mm (dtype None: float32)."""
    cls = _causal_lm_class(config)
    if getattr(config, "num_local_experts", None) or getattr(config, "n_routed_experts", None):
        if cls is None or cls._can_set_experts_implementation():  # Llama4's experts have one implementation
            config._experts_implementation = "batched_mm" if dtype == torch.float64 else "grouped_mm"
    # Gemma2's soft-capping needs the eager path; an unknown class tries SDPA and transformers decides
    config._attn_implementation = "sdpa" if cls is None or getattr(cls, "_supports_sdpa", True) else "eager"
    return config


def _causal_lm_class(config: transformers.PretrainedConfig) -> type | None:
    try:
        cls = transformers.AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, ValueError, AttributeError):
        return None
    return cls if hasattr(cls, "_can_set_experts_implementation") else None


def bundled_config(name: str) -> transformers.PretrainedConfig:
    return pin_static_paths(BUNDLED[name].config())


def init_model(config: transformers.PretrainedConfig, dtype: torch.dtype, meta: bool) -> nn.Module:
    """A model of `config` with seeded random weights, or on meta with none: there, no initializer
    runs (transformers' no_init_weights, then the weight tying it also skips, as transformers does
    for a ZeRO-3 model): a deep model builds in about 30% less time."""
    pin_static_paths(config, dtype)
    if meta:
        with torch.device("meta"), hf_init.no_init_weights():
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
        model.tie_weights()
        return model.eval()
    torch.manual_seed(INIT_SEED)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False).eval()


def _load_checkpoint(path: Path, dtype: torch.dtype) -> nn.Module:
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: not a checkpoint directory (no config.json); "
                         "give a directory written by save_pretrained, a config.json, or a bundled name")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.glob("*.bin"))
        raise ModelError(f"{path}: checkpoint has config.json but no weight files (*.safetensors)"
                         + (f"; planc does not read pickled weights ({', '.join(pickled)}): re-save them with "
                            "save_pretrained(DIR, safe_serialization=True)" if pickled else ""))
    data = read_config(path / "config.json")  # located errors for what planc refuses, before transformers reads it
    quantized(data, path / "config.json")
    known_model_type(data, path / "config.json")
    hf_logging.disable_progress_bar()  # a per-tensor progress bar is noise in `planc run` output
    local = {"local_files_only": True, "trust_remote_code": False}
    try:
        config = transformers.AutoConfig.from_pretrained(path, **local)
        multimodal = causal_or_multimodal(config, path)
        cls = transformers.AutoModelForCausalLM if multimodal is None else _multimodal_class(config, path)
        pinned = pin_static_paths(config, dtype) if multimodal is None else pin_multimodal(config, dtype)
        verbosity = hf_logging.get_verbosity()
        # transformers' load report lists the tensors it leaves unread (a multimodal checkpoint's
        # towers, for its causal LM); what planc needs, missing tensors, it checks below
        hf_logging.set_verbosity_error()
        try:
            model, loaded = cls.from_pretrained(path, config=pinned, dtype=dtype,
                                                use_safetensors=True, output_loading_info=True, **local)
        finally:
            hf_logging.set_verbosity(verbosity)
    except ModelError:
        raise
    except Exception as exc:  # transformers raises many types for bad files
        raise ModelError(f"{path}: cannot load checkpoint: {type(exc).__name__}: {one_line(exc)}. "
                         "Check that the files are complete (re-save with save_pretrained)") from exc
    missing = sorted(loaded.get("missing_keys") or ())
    if missing:  # transformers would leave them at their random initial values, and warn
        listed = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ModelError(f"{path}: the checkpoint's weight files lack {len(missing)} of {type(model).__name__}'s "
                         f"tensors ({listed}); a model with random weights in their place is not this checkpoint. "
                         "Check that every *.safetensors file is present (re-save with save_pretrained)")
    return model.eval() if multimodal is None else language_model(model.eval(), path)


# On a model planc built from the text part of a multimodal checkpoint or config: the multimodal
# class it comes from (what `planc compile` notes).
LANGUAGE_MODEL_OF = "planc_language_model_of"


def causal_or_multimodal(config: transformers.PretrainedConfig, where: Path | str) -> str | None:
    """None for a causal LM; the multimodal class's name (multimodal_name) for a multimodal model
    whose text part is one; refused for anything else."""
    text, name = _text_config(config), multimodal_name(config)
    if name is None and type(config) not in transformers.AutoModelForCausalLM._model_mapping:
        nested = f", nor is its text config ({type(text).__name__}) a causal LM's or a decoder's" if text is not config else ""
        raise ModelError(f"{where}: {type(config).__name__} (model_type {getattr(config, 'model_type', '?')!r}) is "
                         f"not a causal LM transformers builds{nested}; planc compiles causal LMs, and the language "
                         "model of a multimodal model whose text part is a decoder transformers has")
    return name


def _decoder_class(text: transformers.PretrainedConfig) -> type | None:
    """The decoder transformers builds for a text config it has no causal LM class for (Qwen2-VL's
    Qwen2VLTextModel), None where it has none."""
    try:
        return transformers.AutoModel._model_mapping[type(text)]
    except (KeyError, ValueError, AttributeError):
        return None


def _text_config(config: transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    """The config of a model's text part: itself for a text model."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def multimodal_name(config: transformers.PretrainedConfig) -> str | None:
    """The multimodal class `config` describes where its language model is a causal LM transformers
    has under another class (Gemma 3, LLaVA, Mistral 3, PaliGemma, SmolVLM, InternVL, ...), or a
    decoder it has no causal LM class for (Qwen2-VL, Qwen3-VL, GLM-4V, ...): the towers and
    projector feed it image or audio embeddings, and for text alone it is the whole model; None
    otherwise."""
    text = _text_config(config)
    mapping = transformers.AutoModelForCausalLM._model_mapping
    causal = mapping[type(text)] if text is not config and type(text) in mapping else None
    if causal is None and (text is config or _decoder_class(text) is None):
        return None
    outer = mapping[type(config)] if type(config) in mapping else None
    if outer is not None and outer is causal:  # a text model whose config nests its text part (Qwen3.5)
        return None
    named = [a for a in getattr(config, "architectures", None) or [] if isinstance(a, str)]
    return named[0] if named else (outer.__name__ if outer is not None else type(config).__name__)


def _multimodal_class(config: transformers.PretrainedConfig, path: Path) -> type:
    """The class transformers builds the multimodal checkpoint as: the one config.json's
    architectures names (a transformers class; nothing the checkpoint ships), else the
    image-text-to-text class of its config."""
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    mapping = transformers.AutoModelForImageTextToText._model_mapping
    if type(config) in mapping:
        return mapping[type(config)]
    raise ModelError(f"{path}: a multimodal config ({type(config).__name__}) naming no class transformers has "
                     "(config.json's architectures); planc compiles the language model of the class named there")


def language_model(multimodal: nn.Module, where: Path | str) -> nn.Module:
    """The causal LM of a multimodal model's text part, holding the multimodal model's own decoder
    and lm_head (no copy), checked on a probe to compute the multimodal model's logits for text
    alone: a class that treats them otherwise (a logit scale its text class applies and it does
    not, say) is refused rather than compiled into another model."""
    text = multimodal.config.get_text_config()
    name = type(multimodal).__name__
    try:
        decoder, head = multimodal.get_decoder(), multimodal.get_output_embeddings()
    except Exception as exc:  # a multimodal class whose language model transformers cannot hand out
        raise ModelError(f"{where}: {name} does not hand out its language model's decoder and head "
                         f"({type(exc).__name__}: {one_line(exc)}); planc compiles a language model it can take "
                         "apart from its towers") from exc
    mapping = transformers.AutoModelForCausalLM._model_mapping
    if type(text) in mapping:
        cls = mapping[type(text)]
        with torch.device("meta"), hf_init.no_init_weights():
            model = cls(text)
        if type(decoder) is not type(model.model) or not isinstance(head, nn.Linear):
            raise ModelError(f"{where}: {name}'s language model ({type(decoder).__name__}, head "
                             f"{type(head).__name__}) is not the decoder and lm_head of {cls.__name__}, its text "
                             "config's causal LM; planc compiles multimodal models whose language model is one")
        model.model, model.lm_head = decoder, head
    else:  # a decoder transformers builds only inside the multimodal class (Qwen2-VL's)
        if not isinstance(head, nn.Linear):
            raise ModelError(f"{where}: {name}'s output head is a {type(head).__name__}, not a Linear over its "
                             f"decoder ({type(decoder).__name__}); planc compiles language models ending in one")
        model = _text_causal_lm(multimodal.config, decoder, head, multimodal.generation_config)
    model.eval()
    setattr(model, LANGUAGE_MODEL_OF, name)
    if head.weight.is_meta:  # nothing to run: a dry run plans the language model as its causal LM computes it
        return model
    probe = torch.arange(3, 3 + PROBE_TOKENS, device=head.weight.device).remainder(text.vocab_size)[None]
    with torch.no_grad():
        got = model(input_ids=probe).logits
        try:
            want = multimodal(input_ids=probe).logits
        except Exception as exc:  # a multimodal forward that needs its images (or breaks without them)
            raise ModelError(f"{where}: {name} does not run on text alone ({type(exc).__name__}: {one_line(exc)}), "
                             "so planc cannot confirm that its language model is the whole model for text") from exc
    diff = (got.float() - want.float()).abs().max().item() if got.shape == want.shape else float("nan")
    if not diff <= PROBE_TOLERANCE * want.float().abs().max().item():
        raise ModelError(f"{where}: {name} computes other logits for text alone than {type(model).__name__}, its language "
                         f"model's causal LM (max diff {diff:.3g} on a probe of {PROBE_TOKENS} tokens: the multimodal "
                         "class treats the decoder's output otherwise, a logit scale or cap one applies and the "
                         "other does not); planc compiles the language model as its causal LM computes it, "
                         "which is not this model")
    return model


PROBE_TOKENS = 4
PROBE_TOLERANCE = 1e-3  # of the largest logit: the same modules on the same tokens, bar the order of a reduction


def quant_method(quant) -> str | None:
    """A config's quantization_config (a dict in config.json, an object on a built config) by its
    quant_method; None when there is none."""
    if not quant:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(method) if method is not None else "?"


def quantized(config: dict, path: Path) -> None:
    """A checkpoint stored quantized (DeepSeek-V3's fp8 blocks with their scales, GPTQ, AWQ, ...) is
    refused before transformers reads it: planc slices and runs unquantized weights."""
    method = quant_method(config.get("quantization_config"))
    if method is None:
        return
    raise ModelError(f"{path}: quantization_config (quant_method {method!r}): the weights are stored quantized, "
                     "and planc compiles unquantized float32 / bfloat16 / float16 weights; dequantize the checkpoint "
                     "first (for DeepSeek-V3's fp8 weights, multiply each weight by its weight_scale_inv blocks and "
                     "save in bfloat16), or plan on its config.json with --meta")


def known_model_type(config: dict, path: Path) -> None:
    """A model_type transformers does not ship (a checkpoint's own code, named by auto_map) is
    refused: planc runs no code a checkpoint brings. When config.json's architectures name a class
    transformers has (Kimi-K2's DeepseekV3ForCausalLM), the error says which model_type builds it."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type in CONFIG_MAPPING_NAMES:
        return
    named = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    # several model types may share a class (exaone, internlm3 and llama build LlamaForCausalLM): the
    # one the class is named after first
    native = min(((a, t) for a in named for t, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if cls == a),
                 key=lambda found: not found[0].lower().startswith(found[1].replace("_", "").replace("-", "")),
                 default=None)
    custom = " (its modeling code ships with the checkpoint, auto_map; planc runs none)" if config.get("auto_map") else ""
    hint = (f"; its architectures name {native[0]}, which transformers has: set \"model_type\": \"{native[1]}\" in "
            f"a copy of config.json to build it as that model (the lift checks it against the weights)" if native else
            "; planc lifts causal LMs of the model types transformers ships")
    raise ModelError(f"{path}: model_type {model_type!r} is not one transformers {transformers.__version__} knows"
                     f"{custom}{hint}")


def _load_config_file(path: Path, dtype: torch.dtype, meta: bool) -> nn.Module:
    data = read_config(path)
    known_model_type(data, path)
    try:
        config = transformers.AutoConfig.for_model(**data)
    except Exception as exc:
        raise ModelError(f"{path}: not a valid transformers config: {type(exc).__name__}: {one_line(exc)}") from exc
    multimodal = causal_or_multimodal(config, path)
    try:
        return _build_from_config(config, multimodal, path, dtype, meta)
    except ModelError:
        raise
    except Exception as exc:  # transformers' own code failing on the config (a rope section that does not fit)
        raise ModelError(f"{path}: transformers cannot build this config's model: {type(exc).__name__}: "
                         f"{one_line(exc)}; check the config's values against each other") from exc


def _build_from_config(config: transformers.PretrainedConfig, multimodal: str | None, path: Path,
                       dtype: torch.dtype, meta: bool) -> nn.Module:
    if multimodal is None:
        return init_model(config, dtype, meta)
    if meta:  # the text part alone: no weights to probe, the whole multimodal model need not be built
        text = config.get_text_config()
        text.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))  # as the multimodal class ties
        if type(text) in transformers.AutoModelForCausalLM._model_mapping:
            model = init_model(text, dtype, meta)
        else:  # a decoder only the multimodal class builds (Qwen2-VL's): it and a head, as that class has them
            pin_static_paths(text, dtype)
            with torch.device("meta"), hf_init.no_init_weights():
                decoder = _decoder_class(text)._from_config(text, dtype=dtype)
                head = nn.Linear(text.hidden_size, text.vocab_size, bias=False, dtype=dtype)
            if text.tie_word_embeddings:
                head.weight = decoder.get_input_embeddings().weight
            model = _text_causal_lm(config, decoder, head).eval()
        setattr(model, LANGUAGE_MODEL_OF, multimodal)
        return model
    torch.manual_seed(INIT_SEED)
    built = _multimodal_class(config, path)._from_config(pin_multimodal(config, dtype), dtype=dtype)
    return language_model(built.eval(), path)


def _text_causal_lm(config: transformers.PretrainedConfig, decoder: nn.Module, head: nn.Linear,
                    generation=None) -> nn.Module:
    """planc's causal LM over a multimodal model's decoder and head (planc.models.text_lm), on its
    text config, with the token ids the runtime and generate() read where the text config has none:
    the multimodal config's, else its generation config's (Qwen3-VL keeps them there), else None."""
    from planc.models.text_lm import TextCausalLM

    text = config.get_text_config()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(text, key, None) is None:
            found = [getattr(source, key, None) for source in (config, generation)]
            setattr(text, key, next((v for v in found if v is not None), None))
    model = TextCausalLM(text, decoder, head)
    if generation is not None:
        model.generation_config = generation
    return model


def pin_multimodal(config: transformers.PretrainedConfig, dtype: torch.dtype) -> transformers.PretrainedConfig:
    """pin_static_paths for a multimodal model: on its text config (its experts) and on itself."""
    pin_static_paths(config.get_text_config(), dtype)
    return pin_static_paths(config, dtype)


def _load_factory(ref: str) -> nn.Module:
    module_name, _, attr = ref.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError, TypeError) as exc:  # ValueError, TypeError: '', '..x'
        raise ModelError(f"model {ref!r}: cannot import {attr!r} from {module_name!r}: {exc}") from exc
    model = factory()
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {ref!r}: factory returned {type(model).__name__}, expected an nn.Module")
    return model.eval()


def load_model(source: str, *, dtype: torch.dtype | str = "auto", meta: bool = False) -> nn.Module:
    """Resolve MODEL (see module docstring) into an eval-mode nn.Module of `dtype` (a torch dtype, a
    plan dtype name, or "auto")."""
    dtype = resolve_dtype(source, dtype)
    kind = source_kind(source)
    if kind == "bundled":
        return _load_bundled(source, dtype, meta)
    if kind == "checkpoint":
        return _load_checkpoint(Path(source), dtype)
    if kind == "config":
        return _load_config_file(Path(source), dtype, meta)
    if kind == "factory":
        return _load_factory(source)
    raise ModelError(f"model {source!r}: not a bundled name ({', '.join(BUNDLED)}), checkpoint directory, "
                     "config.json or package.module:factory")


def source_kind(source: str) -> Literal["bundled", "checkpoint", "config", "factory"] | None:
    """Which of the four kinds of MODEL (module docstring) `source` is; None for none of them."""
    if source in BUNDLED:
        return "bundled"
    path = local_path(source)
    if path is not None and path.is_dir():
        return "checkpoint"
    if path is not None and path.is_file() and path.suffix == ".json":
        return "config"
    if ":" in source and path is None:
        return "factory"
    return None


def local_path(source: str) -> Path | None:
    """`source` as an existing file or directory; None when nothing is there (or the name cannot
    be one: too long, a NUL byte, a component that is not a directory)."""
    path = Path(source)
    try:
        return path if path.exists() else None
    except (OSError, ValueError):
        return None


def resolve_dtype(source: str, dtype: torch.dtype | str) -> torch.dtype:
    """A plan's model.dtype for MODEL: "auto" is the checkpoint's stored dtype (module docstring)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        return DTYPES[dtype]
    path = Path(source)
    kind = source_kind(source)
    if kind == "config":
        return _config_dtype(path) or torch.float32
    if kind != "checkpoint" or not (path / "config.json").is_file():
        return torch.float32
    return _config_dtype(path / "config.json") or _safetensors_dtype(path) or torch.float32


def read_config(path: Path) -> dict:
    """A config.json's fields; ModelError, one located line, for anything else."""
    try:
        config = read_json(path, MAX_CONFIG_BYTES)
    except ValueError as exc:
        raise ModelError(f"{exc}; give a config.json written by save_pretrained") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: a JSON {type(config).__name__}, not an object of config fields; "
                         "give a config.json written by save_pretrained")
    return config


def _config_dtype(path: Path) -> torch.dtype | None:
    config = read_config(path)
    named = config.get("dtype") or config.get("torch_dtype")
    return DTYPES.get(str(named).removeprefix("torch.")) if named else None


def _safetensors_dtype(checkpoint: Path) -> torch.dtype | None:
    """The most common floating dtype among the tensors of the checkpoint's first safetensors file."""
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        return None
    try:
        with open(files[0], "rb") as f:  # header: u64 little-endian length, then JSON {name: {dtype, ...}}
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(length, SAFETENSORS_MAX_HEADER)))
        found = Counter(v["dtype"] for k, v in header.items() if k != "__metadata__" and v["dtype"] in SAFETENSORS_DTYPES)
    except (OSError, struct.error, ValueError, TypeError, AttributeError, KeyError):
        return None  # not a readable header: loading the checkpoint reports the broken file
    return DTYPES[SAFETENSORS_DTYPES[found.most_common(1)[0][0]]] if found else None


def dtype_name(model: nn.Module) -> str:
    """The plan dtype name of a model's floating parameters (float32 for a model without any)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return next((name for name, d in DTYPES.items() if d == dtype), str(dtype).removeprefix("torch."))


def _load_bundled(name: str, dtype: torch.dtype, meta: bool) -> nn.Module:
    entry = BUNDLED[name]
    if entry.full_size and not meta:
        raise ModelError(f"model {name!r} is a full-size config with no bundled weights; "
                         "compile it with --meta for a weightless dry run")
    trained = WEIGHTS_DIR / name
    if (trained / "config.json").is_file() and not meta:
        return _load_checkpoint(trained, dtype)
    return init_model(entry.config(), dtype, meta)
