"""BERT checkpoints (``BertForPreTraining``, ``BertForMaskedLM``, ``BertForSequenceClassification``)
<-> the encoder family.

``model_keys`` reads a BERT ``config.json`` into ``model.*`` keys and refuses by name what the
encoder cannot compute exactly (relative position embeddings, a decoder or cross-attention,
untied output embeddings, another activation); ``to_hf`` writes one back. The tensor mapping is
the encoder body (``body_links``) plus the heads each architecture carries (``HEADS``), each head
a list of :class:`~slimjax.interop.mapping.Link` from ``HEAD_LINKS``: another architecture
registers its heads in these two tables. Parameters of the encoder that an architecture does not
carry (the pooler and NSP head of ``BertForMaskedLM``) import as zeros.

``BertForSequenceClassification`` is the encoder with the ``classify`` transform (its pooler and
a ``classifier`` head): ``labels`` reads its ``id2label`` as ``slim.classify.classes`` (refusing
what softmax cross-entropy over the classes is not: regression, multi-label) and ``to_hf`` writes
the classes back.

Layouts: ``nn.Linear`` weights are ``[out, in]``; slimjax kernels are ``[in..., out...]`` with
heads as a real axis (``query.weight [H*hd, D] -> wq [D, H, hd]``).
"""

from __future__ import annotations

from typing import Any, Callable

from slimjax.config import ModelConfig
from slimjax.errors import SlimjaxError
from slimjax.interop.mapping import Link, flatten_to, merge_out, reshape, same, split_out, transpose

PREFIX = "bert."
# BERT hidden_act -> slimjax model.mlp (the same function: erf GELU, or its tanh approximation).
ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}


def body_links(cfg: ModelConfig) -> list[Link]:
    """Embeddings and encoder layers (``bert.*``)."""
    h, hd, d = cfg.n_heads, cfg.head_dim, cfg.d_model
    emb, layer = PREFIX + "embeddings.", PREFIX + "encoder.layer.{i}."
    links = [
        Link(("embed", "embedding"), emb + "word_embeddings.weight", False, same, same),
        Link(("pos_embed",), emb + "position_embeddings.weight", False, same, same),
        Link(("type_embed",), emb + "token_type_embeddings.weight", False, same, same),
        Link(("embed_norm", "scale"), emb + "LayerNorm.weight", False, same, same),
        Link(("embed_norm", "bias"), emb + "LayerNorm.bias", False, same, same),
    ]
    for name, hf in (("wq", "query"), ("wk", "key"), ("wv", "value")):
        links += [Link(("blocks", "attn", name, "kernel"), f"{layer}attention.self.{hf}.weight", True,
                       split_out(h, hd), merge_out),
                  Link(("blocks", "attn", name, "bias"), f"{layer}attention.self.{hf}.bias", True,
                       reshape(h, hd), flatten_to(0))]
    links += [
        Link(("blocks", "attn", "wo", "kernel"), layer + "attention.output.dense.weight", True,
             lambda w: w.T.reshape(h, hd, d), lambda x: x.reshape(h * hd, -1).T),
        Link(("blocks", "attn", "wo", "bias"), layer + "attention.output.dense.bias", True, same, same),
        Link(("blocks", "mlp", "up", "kernel"), layer + "intermediate.dense.weight", True, transpose, transpose),
        Link(("blocks", "mlp", "up", "bias"), layer + "intermediate.dense.bias", True, same, same),
        Link(("blocks", "mlp", "down", "kernel"), layer + "output.dense.weight", True, transpose, transpose),
        Link(("blocks", "mlp", "down", "bias"), layer + "output.dense.bias", True, same, same),
    ]
    for name, hf in (("attn_norm", "attention.output.LayerNorm"), ("mlp_norm", "output.LayerNorm")):
        links += [Link(("blocks", name, "scale"), f"{layer}{hf}.weight", True, same, same),
                  Link(("blocks", name, "bias"), f"{layer}{hf}.bias", True, same, same)]
    return links


def _dense(path: tuple[str, ...], hf: str) -> list[Link]:
    """A ``nn.Linear`` head layer: its weight (transposed) and bias."""
    return [Link((*path, "kernel"), hf + ".weight", False, transpose, transpose),
            Link((*path, "bias"), hf + ".bias", False, same, same)]


def mlm_links(cfg: ModelConfig) -> list[Link]:
    """``cls.predictions``: transform dense + LayerNorm and the output bias (the decoder weight is tied)."""
    return [*_dense(("mlm", "dense"), "cls.predictions.transform.dense"),
            Link(("mlm", "norm", "scale"), "cls.predictions.transform.LayerNorm.weight", False, same, same),
            Link(("mlm", "norm", "bias"), "cls.predictions.transform.LayerNorm.bias", False, same, same),
            Link(("mlm", "bias"), "cls.predictions.bias", False, same, same)]


def pooler_links(cfg: ModelConfig) -> list[Link]:
    return _dense(("pooler",), PREFIX + "pooler.dense")


def nsp_links(cfg: ModelConfig) -> list[Link]:
    return _dense(("nsp",), "cls.seq_relationship")


def classifier_links(cfg: ModelConfig) -> list[Link]:
    """The ``classify`` transform's head: HF ``classifier.weight [classes, D]`` is its kernel transposed."""
    return _dense((CLASSIFIER,), CLASSIFIER)


CLASSIFIER = "classifier"  # slimjax.slim.classify.HEAD, and Hugging Face's name for it too
ENCODER_HEADS = ("mlm", "pooler", "nsp")  # the encoder's own heads (the classifier is a transform's)
# Extension points: head name -> its links, and architecture -> the heads it carries.
HEAD_LINKS: dict[str, Callable[[ModelConfig], list[Link]]] = {"mlm": mlm_links, "pooler": pooler_links,
                                                              "nsp": nsp_links, CLASSIFIER: classifier_links}
HEADS: dict[str, tuple[str, ...]] = {"BertForPreTraining": ("mlm", "pooler", "nsp"), "BertForMaskedLM": ("mlm",),
                                     "BertForSequenceClassification": ("pooler", CLASSIFIER)}
CLASSIFIER_ARCH = "BertForSequenceClassification"


def links(cfg: ModelConfig, arch: str) -> list[Link]:
    """Every link of architecture ``arch``: the body and its heads."""
    return body_links(cfg) + [link for head in HEADS[arch] for link in HEAD_LINKS[head](cfg)]


def absent_links(cfg: ModelConfig, arch: str) -> list[Link]:
    """Links of the encoder's heads that ``arch`` does not carry (imported as zeros)."""
    return [link for head in ENCODER_HEADS if head not in HEADS[arch] for link in HEAD_LINKS[head](cfg)]


def classifies(arch: str) -> bool:
    """Whether architecture ``arch`` is a sequence classifier (a ``classify`` run in slimjax)."""
    return CLASSIFIER in HEADS.get(arch, ())


def labels(hf: dict[str, Any]) -> tuple[str, ...]:
    """A sequence classifier's class names in id order (``id2label``; ``LABEL_<i>`` for ``num_labels``
    without names), refusing by key what is not one softmax over two or more classes."""
    problem = hf.get("problem_type")
    if problem not in (None, "single_label_classification"):
        raise SlimjaxError(f"config.json 'problem_type' is {problem!r}; slimjax classifiers are trained and scored "
                           "as 'single_label_classification' (one class per text, softmax cross-entropy)")
    names = hf.get("id2label") or {str(i): f"LABEL_{i}" for i in range(int(hf.get("num_labels", 2)))}
    if sorted(int(i) for i in names) != list(range(len(names))):
        raise SlimjaxError(f"config.json 'id2label' keys {sorted(names)} are not the ids 0..{len(names) - 1}")
    classes = tuple(str(names[str(i)] if str(i) in names else names[i]) for i in range(len(names)))
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise SlimjaxError(f"config.json 'id2label' names {list(classes)}; a slimjax classifier needs two or more "
                           "distinct labels (one label is Hugging Face's regression head)")
    return classes


def ignorable(name: str) -> bool:
    """Tensors BERT checkpoints may carry that hold no parameters of their own: the tied MLM decoder
    (a copy of the word embeddings and of ``cls.predictions.bias``) and index buffers."""
    return name in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
                    PREFIX + "embeddings.position_ids", PREFIX + "embeddings.token_type_ids")


def _get(hf: dict[str, Any], key: str) -> Any:
    if hf.get(key) is None:
        raise SlimjaxError(f"config.json has no '{key}'; it is needed to build the BERT encoder")
    return hf[key]


def _refuse(hf: dict[str, Any], key: str, allowed: tuple, default: Any, why: str) -> None:
    value = hf.get(key, default)
    if value not in allowed:
        raise SlimjaxError(f"config.json '{key}' is {value!r}; the slimjax encoder supports only "
                           f"{', '.join(map(repr, allowed))} ({why})")


def model_keys(hf: dict[str, Any]) -> dict[str, Any]:
    """``model.*`` config values equivalent to a BERT ``config.json``."""
    _refuse(hf, "hidden_act", tuple(ACTIVATIONS), "gelu", "erf GELU or its tanh approximation")
    _refuse(hf, "position_embedding_type", ("absolute",), "absolute", "learned absolute positions")
    _refuse(hf, "is_decoder", (False,), False, "a bidirectional encoder")
    _refuse(hf, "add_cross_attention", (False,), False, "no cross-attention")
    _refuse(hf, "tie_word_embeddings", (True,), True, "the MLM output layer is the word embedding table")
    d, heads = int(_get(hf, "hidden_size")), int(_get(hf, "num_attention_heads"))
    if d % heads:
        raise SlimjaxError(f"config.json hidden_size={d} is not a multiple of num_attention_heads={heads}")
    return {
        "family": "encoder", "vocab_size": int(_get(hf, "vocab_size")), "d_model": d,
        "n_layers": int(_get(hf, "num_hidden_layers")), "n_heads": heads, "n_kv_heads": heads, "head_dim": d // heads,
        "d_ff": int(_get(hf, "intermediate_size")), "max_seq_len": int(_get(hf, "max_position_embeddings")),
        "type_vocab_size": int(hf.get("type_vocab_size", 2)), "positions": "learned", "norm": "layernorm",
        "norm_position": "post", "norm_eps": float(hf.get("layer_norm_eps", 1e-12)),
        "mlp": ACTIVATIONS[hf.get("hidden_act", "gelu")], "use_bias": True, "tie_embeddings": True,
        "init_std": float(hf.get("initializer_range", 0.02)),
    }


def check_exportable(cfg: ModelConfig) -> None:
    """Refuses, by key, an encoder that a BERT checkpoint cannot express."""
    wants = {"norm": "layernorm", "norm_position": "post", "use_bias": True, "tie_embeddings": True}
    for key, value in wants.items():
        if getattr(cfg, key) != value:
            raise SlimjaxError(f"a BERT checkpoint needs model.{key}={value!r}, this encoder has "
                               f"{getattr(cfg, key)!r}")
    if cfg.head_dim * cfg.n_heads != cfg.d_model:
        raise SlimjaxError(f"a BERT checkpoint needs model.head_dim * model.n_heads == model.d_model, this encoder "
                           f"has {cfg.head_dim} * {cfg.n_heads} != {cfg.d_model}")


def to_hf(cfg: ModelConfig, arch: str, classes: tuple[str, ...] = ()) -> dict[str, Any]:
    """A BERT ``config.json`` for an encoder (with ``classes``: a sequence classifier's)."""
    check_exportable(cfg)
    if classifies(arch) and not classes:
        raise SlimjaxError(f"{arch} needs a classifier head; export a run whose slim.recipe has 'classify'")
    if classes and not classifies(arch):
        raise SlimjaxError(f"this run is a sequence classifier; export it as {CLASSIFIER_ARCH}, not {arch}")
    act = {v: k for k, v in ACTIVATIONS.items() if k != "gelu_pytorch_tanh"}[cfg.mlp]
    head = {"id2label": dict(enumerate(classes)), "label2id": {c: i for i, c in enumerate(classes)},
            "problem_type": "single_label_classification"} if classes else {}
    return {**head, "architectures": [arch], "model_type": "bert", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "intermediate_size": cfg.d_ff, "hidden_act": act, "max_position_embeddings": cfg.max_seq_len,
            "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.norm_eps,
            "initializer_range": cfg.init_std, "position_embedding_type": "absolute", "is_decoder": False,
            "add_cross_attention": False, "tie_word_embeddings": True, "pad_token_id": 0,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "torch_dtype": "float32"}
