"""Build models from a transformers config, load them from a local Hugging Face checkpoint,
and save them as one.

Nothing is fetched from a hub: ``from_pretrained`` takes a local directory holding
``config.json`` and ``model.safetensors`` (or shards listed in ``model.safetensors.index.json``);
``save_pretrained`` writes such a directory. Both directions use one name mapping
(:func:`_checkpoint_name`): parameter ``("model", "layers", 0, "self_attn", "q_proj", "kernel")``
is checkpoint tensor ``model.layers.0.self_attn.q_proj.weight`` (transposed: nnx kernels are
``[in, out]``, Hugging Face weights ``[out, in]``).
"""

import contextlib
import json
import os
from collections.abc import Callable, Sequence

import jax.numpy as jnp
from flax import nnx
from safetensors import SafetensorError, safe_open

from ls_jax.models.classification import SequenceClassifier
from ls_jax.models.gemma2 import gemma2_spec
from ls_jax.models.llama import llama_spec
from ls_jax.models.transformer import CausalLM, DecoderSpec

# config.model_type -> its DecoderSpec builder
ARCHITECTURES: dict[str, Callable[..., DecoderSpec]] = {
    "llama": llama_spec,
    "mistral": llama_spec,
    "qwen2": llama_spec,
    "gemma2": gemma2_spec,
}
TASKS = ("causal_lm", "sequence_classification")
# checkpoint tensors that are fine to leave unused
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def decoder_spec(config) -> DecoderSpec:
    """The :class:`DecoderSpec` of a transformers config; ValueError if the architecture is unsupported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture model_type={model_type!r} (architectures="
            f"{getattr(config, 'architectures', None)}); supported model types: {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type](config)


def _task(config, task: str | None) -> str:
    if task is None:
        archs = getattr(config, "architectures", None) or []
        task = "sequence_classification" if any(a.endswith("ForSequenceClassification") for a in archs) else "causal_lm"
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return task


def _build(config, task, num_labels, dtype, param_dtype, remat, rngs):
    spec = decoder_spec(config)
    if _task(config, task) == "sequence_classification":
        model = SequenceClassifier(
            spec, num_labels or config.num_labels, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs
        )
    else:
        model = CausalLM(spec, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
    model.hf_config = config.to_json_string()  # static (a str), for save_pretrained's config.json
    return model


def from_config(
    config,
    *,
    task: str | None = None,
    num_labels: int | None = None,
    seed: int = 0,
    rngs: nnx.Rngs | None = None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    remat: bool | str = False,
):
    """Randomly initialised model for a transformers config (``LlamaConfig``, ``MistralConfig``,
    ``Qwen2Config``, ``Gemma2Config``).

    task: "causal_lm" (:class:`CausalLM`) or "sequence_classification"
    (:class:`SequenceClassifier` with ``num_labels`` or ``config.num_labels`` classes); None picks
    from ``config.architectures`` (causal LM unless it names ``*ForSequenceClassification``).
    dtype: compute dtype of activations; param_dtype: stored parameters. ``rngs`` defaults to
    ``nnx.Rngs(seed)``. The model keeps the config as JSON (``model.hf_config``) for
    :func:`save_pretrained`. Example: ``from_config(tiny_llama_config(vocab_size=512))``.
    """
    return _build(config, task, num_labels, dtype, param_dtype, remat, rngs or nnx.Rngs(seed))


def _checkpoint_name(path: tuple) -> tuple:
    """(checkpoint tensor name, transpose?) of an nnx parameter path."""
    names = [str(p) for p in path]
    if names == ["lm_head"]:
        return "lm_head.weight", False
    *head, leaf = names
    if leaf in ("kernel", "embedding"):
        return ".".join(head + ["weight"]), leaf == "kernel"
    return ".".join(names), False


def _may_be_unused(name: str, model) -> bool:
    """Checkpoint tensors the model may leave unused: rotary buffers, and ``lm_head`` when the
    embeddings are tied or the model is a classifier built from a causal-LM checkpoint."""
    if name.endswith(_IGNORED_SUFFIXES):
        return True
    return name == "lm_head.weight" and (not isinstance(model, CausalLM) or model.spec.tie_word_embeddings)


def _safe_open(path: str):
    """``safe_open(path)``; a truncated or malformed file raises ValueError naming it."""
    try:
        return safe_open(path, framework="flax")
    except SafetensorError as e:
        raise ValueError(f"{path}: not a complete safetensors file ({e})") from None


class _Checkpoint:
    """Lazy reader of the safetensors files of a local checkpoint directory."""

    def __init__(self, directory: str):
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.exists(single):
            with _safe_open(single) as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {directory}")
        self.directory, self.weight_map, self._files = directory, weight_map, {}
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def _file(self, name: str):
        fname = self.weight_map[name]
        if fname not in self._files:
            path = os.path.join(self.directory, fname)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{self.directory}: missing checkpoint file {fname} (holds {name})")
            self._files[fname] = self._stack.enter_context(_safe_open(path))
        return self._files[fname]

    def shape(self, name: str) -> tuple:
        """Shape of tensor ``name`` from the file header (no data read)."""
        return tuple(self._file(name).get_slice(name).get_shape())

    def get(self, name: str):
        return self._file(name).get_tensor(name)


def _match(path: str, model, state, ckpt: _Checkpoint) -> list:
    """``(key, var, name, transpose)`` per model parameter (``name`` None: a fresh ``score``
    head); ValueError for missing, unexpected or mis-shaped tensors (shapes from the headers)."""
    plan, used, missing = [], set(), []
    for key, var in nnx.to_flat_state(state):
        name, transpose = _checkpoint_name(key)
        shape = var.get_value().shape
        if name in ckpt.weight_map:
            found = ckpt.shape(name)
            if (found[::-1] if transpose else found) != shape:
                raise ValueError(
                    f"{name}: checkpoint shape {found[::-1] if transpose else found}, model expects {shape}"
                )
            used.add(name)
            plan.append((key, var, name, transpose))
        elif key[0] == "score" and isinstance(model, SequenceClassifier):
            plan.append((key, var, None, False))
        else:
            missing.append(name)
    unexpected = [k for k in ckpt.weight_map if k not in used and not _may_be_unused(k, model)]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the {type(model).__name__} built from its config: "
            f"missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    return plan


def _abstract(path: str, task, num_labels, dtype, param_dtype, remat, seed):
    """(config, abstract model, graphdef, state) of a local checkpoint directory."""
    from transformers import AutoConfig  # deferred: importing transformers takes seconds

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a local checkpoint directory")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = nnx.eval_shape(lambda: _build(config, task, num_labels, dtype, param_dtype, remat, nnx.Rngs(seed)))
    return (config, model, *nnx.split(model))


def check_pretrained(path: str, *, task: str | None = None, num_labels: int | None = None) -> None:
    """Raise what :func:`from_pretrained` would (unsupported architecture, missing files,
    missing / unexpected / mis-shaped tensors) without reading any weights."""
    _, model, _, state = _abstract(path, task, num_labels, jnp.float32, jnp.float32, False, 0)
    with _Checkpoint(path) as ckpt:
        _match(path, model, state, ckpt)


def from_pretrained(
    path: str,
    *,
    task: str | None = None,
    num_labels: int | None = None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    remat: bool | str = False,
    seed: int = 0,
):
    """Load a local Hugging Face checkpoint directory (config.json + safetensors) as an NNX model.

    The architecture comes from ``config.model_type`` (see :data:`ARCHITECTURES`). Loading a
    causal-LM checkpoint as "sequence_classification" keeps the decoder and initialises the
    ``score`` head randomly (``seed``). Nothing is fetched from a hub.

    Args:
      path: a local directory with ``config.json`` and ``model.safetensors`` (or shards listed in
        ``model.safetensors.index.json``).
      task: "causal_lm", "sequence_classification" or None (as in :func:`from_config`).
      num_labels: the classes of a classifier (default ``config.num_labels``).
      dtype: the compute dtype of activations.
      param_dtype: the parameters are cast to it.
      remat: rematerialisation of the decoder layers, as in :func:`from_config`.
      seed: initialises a fresh ``score`` head.

    Returns:
      :class:`CausalLM` or :class:`SequenceClassifier` with the checkpoint's weights (kernels
      ``[in, out]``), keeping the config for :func:`save_pretrained`.

    Raises:
      FileNotFoundError: ``path`` is not a directory or lacks the safetensors files.
      ValueError: an unsupported architecture or task, a truncated safetensors file, or missing /
        unexpected / mis-shaped tensors.

    Examples:
      >>> import tempfile
      >>> import numpy as np
      >>> from flax import nnx
      >>> from ls_jax.models import from_config, from_pretrained, save_pretrained, tiny_llama_config
      >>> model = from_config(tiny_llama_config(vocab_size=64, hidden_size=16, num_hidden_layers=1))
      >>> path = tempfile.mkdtemp()
      >>> save_pretrained(model, path)
      >>> loaded = from_pretrained(path)
      >>> type(loaded).__name__
      'CausalLM'
      >>> pairs = zip(nnx.to_flat_state(nnx.state(model, nnx.Param)), nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
      >>> all(np.array_equal(a.get_value(), b.get_value()) for (_, a), (_, b) in pairs)
      True
    """
    config, model, graphdef, state = _abstract(path, task, num_labels, dtype, param_dtype, remat, seed)
    init = nnx.initializers.normal(config.initializer_range)
    loaded = []
    with _Checkpoint(path) as ckpt:
        for key, var, name, transpose in _match(path, model, state, ckpt):
            if name is None:
                value = init(nnx.Rngs(seed).params(), var.get_value().shape, param_dtype)
            else:
                value = ckpt.get(name)
                value = value.T if transpose else value
            loaded.append((key, var.replace(jnp.asarray(value, param_dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def save_pretrained(model, path: str, *, config=None, labels: Sequence[str] | None = None) -> None:
    """Write ``model`` as a local Hugging Face checkpoint directory: ``config.json`` and
    ``model.safetensors``.

    Tensor names and ``[out, in]`` layouts are those transformers expects; parameters keep their
    own dtype; tied embeddings are stored once, as ``model.embed_tokens.weight``. A
    :class:`SequenceClassifier` is written as ``*ForSequenceClassification`` with its
    ``num_labels``. ``from_pretrained(path)`` and transformers' ``AutoModelForCausalLM`` (or
    ``AutoModelForSequenceClassification``) ``.from_pretrained(path)`` load it back.

    Args:
      model: a :class:`CausalLM` or :class:`SequenceClassifier` (a LoRA-wrapped model must be
        merged first, ``ls_jax.train.lora.merge_lora``).
      path: the directory to write (created if absent).
      config: the transformers config to write; None uses the one the model was built from
        (``model.hf_config``, set by :func:`from_config` / :func:`from_pretrained`).
      labels: a classifier's class names, in class order, written as ``id2label`` / ``label2id``
        (default: transformers' ``LABEL_0``, ``LABEL_1``, ...).

    Returns:
      None.

    Raises:
      ValueError: the model carries no config and none is given; ``labels`` for a model that is
        not a classifier, or not one per class; LoRA adapters not merged.

    Examples:
      >>> import json, os, tempfile
      >>> from ls_jax.models import from_config, save_pretrained, tiny_llama_config
      >>> config = tiny_llama_config(vocab_size=64, hidden_size=16, num_hidden_layers=1)
      >>> classifier = from_config(config, task="sequence_classification", num_labels=2)
      >>> path = tempfile.mkdtemp()
      >>> save_pretrained(classifier, path, labels=["negative", "positive"])
      >>> sorted(os.listdir(path))
      ['config.json', 'model.safetensors']
      >>> with open(os.path.join(path, "config.json")) as f:
      ...     written = json.load(f)
      >>> written["architectures"], written["id2label"]
      (['LlamaForSequenceClassification'], {'0': 'negative', '1': 'positive'})
    """
    from safetensors.flax import save_file
    from transformers import AutoConfig  # deferred: importing transformers takes seconds

    if config is None:
        if not hasattr(model, "hf_config"):
            raise ValueError(
                "the model carries no transformers config (not built by from_config / from_pretrained): pass config="
            )
        config = AutoConfig.for_model(**json.loads(model.hf_config))
    if isinstance(model, SequenceClassifier):  # e.g. built from a causal-LM config with task=
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as names

        config = AutoConfig.for_model(**config.to_dict())  # a copy: the caller's config is left as it is
        config.architectures = [names[config.model_type]]
        config.num_labels = model.num_labels
        if labels is not None:
            if len(labels) != model.num_labels:
                raise ValueError(f"{len(labels)} labels for a classifier of {model.num_labels} classes")
            config.id2label = dict(enumerate(labels))
            config.label2id = {name: i for i, name in enumerate(labels)}
    elif labels is not None:
        raise ValueError("labels= is for a SequenceClassifier")
    tensors = {}
    for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if isinstance(var, nnx.LoRAParam):
            raise ValueError(f"{'.'.join(map(str, key))} is a LoRA adapter: merge the adapters before saving")
        name, transpose = _checkpoint_name(key)
        value = var.get_value()
        tensors[name] = jnp.asarray(value.T if transpose else value)
    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
