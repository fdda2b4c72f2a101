"""Every key slimjax reads, with its default. Other configs start here and override.

Each key carries a one-line comment; `slimjax.config.validate` turns this into frozen dataclasses.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = m = ml_collections.ConfigDict()
    m.family = "decoder"  # "decoder" (causal LM: GPT-2, Llama) or "encoder" (bidirectional, BERT: MLM + NSP)
    m.vocab_size = 1024  # tokenizer vocabulary size; the embedding table's first dimension
    m.d_model = 128  # residual stream width
    m.n_layers = 4  # number of decoder blocks
    m.n_heads = 8  # query heads per attention layer
    m.n_kv_heads = 4  # key/value heads (== n_heads: multi-head; fewer: grouped-query attention)
    m.head_dim = 16  # width of each attention head
    m.d_ff = 384  # hidden width of the MLP (per branch for SwiGLU)
    m.max_seq_len = 256  # longest sequence the model accepts (size of learned position table)
    m.positions = "rope"  # "learned" (GPT-2) or "rope" (Llama)
    m.rope_theta = 10000.0  # RoPE base frequency
    m.rope_scaling = "none"  # RoPE frequency scaling: "none", "linear" (divide by factor) or "llama3" (Llama 3.1 bands)
    m.rope_factor = 1.0  # RoPE scaling factor ("linear" and "llama3")
    m.rope_low_freq_factor = 1.0  # "llama3": wavelengths above original_max_len / this are divided by the factor
    m.rope_high_freq_factor = 4.0  # "llama3": wavelengths below original_max_len / this are kept
    m.rope_original_max_len = 8192  # "llama3": context length the frequencies were trained for
    m.norm = "rmsnorm"  # "layernorm" (GPT-2) or "rmsnorm" (Llama)
    m.norm_position = "pre"  # "pre" (x + f(norm(x)); decoders) or "post" (norm(x + f(x)); BERT); the encoder reads it
    m.norm_eps = 1e-5  # epsilon inside the normalisation
    m.mlp = "swiglu"  # "gelu" (GPT-2's tanh approximation), "gelu_exact" (erf, BERT) or "swiglu" (Llama)
    m.use_bias = False  # biases on linear layers and LayerNorm (GPT-2: True)
    m.tie_embeddings = True  # reuse the token embedding as the output projection
    m.init_std = 0.02  # std of the normal initialiser (output projections scaled by 1/sqrt(2L))
    m.dtype = "auto"  # compute dtype: "auto" = bfloat16 on TPU/GPU, float32 on CPU
    m.scan_layers = True  # jax.lax.scan over stacked layers (fast compile) instead of unrolling
    m.scan_unroll = 1  # layers per scan iteration (n_layers: unrolled code, stacked parameters kept)
    m.remat = "none"  # rematerialisation: "none", "dots" (save matmul outputs), "full"
    m.attention = "auto"  # jax.nn.dot_product_attention backend: "auto" (cuDNN on GPU), "xla", "cudnn"
    m.type_vocab_size = 2  # encoder: rows of the token-type (segment A/B) embedding

    c.mesh = mesh = ml_collections.ConfigDict()
    mesh.data = -1  # data-parallel axis size (-1: all devices left over)
    mesh.fsdp = 1  # fully-sharded data-parallel axis size (shards parameters and optimizer state)
    mesh.tensor = 1  # tensor-parallel axis size (shards heads, MLP and vocabulary)
    mesh.stage = 1  # pipeline-parallel axis size (splits the stacked layers into stages)
    mesh.sequence = 1  # sequence/context-parallel axis size (splits activations along their length)
    mesh.pipeline_schedule = "gpipe"  # with mesh.stage > 1: "gpipe" or "circular" (interleaved)
    mesh.pipeline_microbatches = 0  # microbatches through the pipeline (0: one per stage)
    mesh.pipeline_repeats = 1  # circular schedule: layer groups per stage (bubble / repeats)
    mesh.sequence_attention = "allgather"  # with mesh.sequence > 1: "allgather" keys/values or "ring"
    mesh.sequence_balance = True  # causal load balancing: equal attention work on every sequence shard
    # Overrides only: (logical_name, mesh_axes) pairs replacing entries of DEFAULT_RULES in
    # slimjax/sharding.py, which maps every logical name; e.g. (("embed", None), ("mlp", ("fsdp", "tensor"))).
    mesh.rules = ()  # logical axis name -> mesh axes (None replicates) for the names to change

    c.data = d = ml_collections.ConfigDict()
    # Weighted mixture of corpora. Each entry is "kind", "kind:path" or a dict with keys kind,
    # path, weight (1.0), eval_path (""), set_name (""), text_key ("text"), data_dir (""). Kinds:
    # shakespeare (bundled), stdlib (Python's own sources), text (glob of files), jsonl (glob of
    # .jsonl / .jsonl.zst, SlimPajama layout), slimpajama (the 7-source SlimPajama mixture from a
    # jsonl glob), tfds (TFDS dataset name, read through tfds.data_source / ArrayRecord).
    # Fine-tuning kinds: genre (bundled: Shakespeare passages labelled by genre, split by play),
    # labels (JSON Lines glob, fields "text" and "label", for slim.classify) and pairs (JSON Lines
    # glob, fields "prompt" and "response": supervised fine-tuning, loss on response tokens only).
    # prepared ("prepared:DIR", the only source when used): rows pre-tokenized by `slimjax tokenize
    # --out=DIR`, read from its ArrayRecord shards with random access (memory flat in the corpus size;
    # data.seq_len, packing, shards and tokenizer_kind must be those it was tokenized with).
    d.sources = ({"kind": "shakespeare", "weight": 1.0},)
    d.eval_plays = ("hamlet", "the-tempest", "twelfth-night")  # shakespeare: plays held out for evaluation
    d.eval_fraction = 0.02  # other sources without eval_path: share of documents held out for evaluation
    d.seq_len = 128  # tokens per training row (rows are packed documents with segment ids)
    d.tokenizer_kind = "sentencepiece"  # "sentencepiece", "huggingface" (tokenizer.json) or "byte" (UTF-8 bytes)
    d.tokenizer = ""  # .model / tokenizer.json path; "" (sentencepiece) trains one on the training documents, cached in the workdir
    d.tokenizer_type = "bpe"  # SentencePiece algorithm when training: "bpe" (seconds) or "unigram" (slower)
    d.packing = "concat_split"  # "concat_split" (no padding, documents cut at row ends) or "first_fit" (whole documents where they fit)
    d.shards = 0  # logical data shards (each step takes equal rows from each); 0 = one per global-batch row
    d.nfc = True  # Unicode NFC normalisation of every document
    d.min_doc_chars = 0  # drop documents shorter than this many characters (0 keeps all)
    d.strict = False  # malformed input records fail with file:line instead of being skipped and counted
    d.prefetch = 4  # batches prepared ahead by background threads

    c.optimizer = o = ml_collections.ConfigDict()
    o.name = "adamw"  # "adamw", "adafactor" or "lion"
    o.learning_rate = 3e-3  # peak learning rate after warm-up
    o.warmup_steps = 30  # linear warm-up steps from 0
    o.min_lr_ratio = 0.1  # cosine decay ends at learning_rate * min_lr_ratio
    o.b1 = 0.9  # first-moment decay (AdamW, Lion)
    o.b2 = 0.95  # second-moment decay (AdamW, Lion)
    o.eps = 1e-8  # AdamW epsilon
    o.weight_decay = 0.1  # decoupled weight decay (0 disables)
    o.decay_exclude = ("norm", "bias", "embed")  # regexes on parameter paths spared weight decay
    o.clip_norm = 1.0  # global-norm gradient clipping (0 disables)

    c.train = t = ml_collections.ConfigDict()
    t.steps = 300  # optimizer steps to run in total (a resumed run continues up to this)
    t.global_batch_size = 16  # rows per step across all devices and microbatches
    t.microbatches = 1  # gradient accumulation: split each batch into this many sequential pieces
    t.seed = 0  # seeds parameter init and data shuffling
    t.log_every = 10  # steps between metric writes (TensorBoard, metrics.jsonl, progress bar)
    t.eval_every = 100  # steps between evaluations on the held-out plays
    t.eval_batches = 8  # batches per evaluation (0: the whole held-out set)
    t.early_stop_patience = 0  # stop after this many evaluations without a better checkpoint.best_metric (0: never)
    t.progress = True  # show a progress bar on process 0
    t.nonfinite = "stop"  # non-finite loss/gradient: "stop" (error naming step and leaves, no checkpoint of it) or "skip" (drop the update, count it)
    t.sample_tokens = 48  # decoders: tokens of a greedy sample printed at the end of training (0 disables)
    t.sample_prompt = "ROMEO:"  # the prompt of that sample

    c.checkpoint = ck = ml_collections.ConfigDict()
    ck.every_steps = 100  # steps between Orbax checkpoints (one is always written at the end)
    ck.keep = 3  # most recent checkpoints kept on disk
    ck.keep_every = 0  # also keep every checkpoint whose step is a multiple of this, forever (0: off)
    ck.keep_best = 0  # also keep this many checkpoints with the best checkpoint.best_metric (0: off)
    ck.best_metric = "loss"  # eval metric ranking keep_best and early stopping: "loss" (lower wins), "accuracy" or "macro_f1" (higher wins)
    ck.async_save = True  # write checkpoints in the background while training continues
    ck.init_from = ""  # fresh runs start from these params (a run dir, its checkpoints/ dir, or checkpoints/STEP); optimizer state starts fresh

    c.objective = obj = ml_collections.ConfigDict()
    # The train step minimises sum_i weight_i * term_i; every term is logged (train/terms/NAME).
    obj.next_token = 1.0  # mean next-token cross-entropy over target tokens
    obj.z_loss = 0.0  # mean log(Z)^2 over target tokens (PaLM uses 1e-4)
    obj.mlm = 0.0  # encoder: mean cross-entropy over the masked tokens (BERT: 1.0)
    obj.nsp = 0.0  # encoder: mean cross-entropy of the pair head (next-sentence or sentence-order; BERT: 1.0)

    c.pretrain = pre = ml_collections.ConfigDict()
    # Encoder pre-training rows: [CLS] A [SEP] B [SEP] from consecutive pieces of one document
    # ([CLS] = the tokenizer's BOS, [SEP] = its EOS), with masked tokens for the MLM head.
    pre.mask_rate = 0.15  # share of each row's non-special tokens chosen for prediction, in (0, 1)
    pre.whole_word = False  # choose whole words (all pieces of a SentencePiece word) instead of single pieces
    pre.pair_task = "nsp"  # "nsp": B is the next piece or (50%) a piece of another document; "sop" (ALBERT): A, B swapped (50%)
    pre.mask_id = 1  # the [MASK] id: 1 is the unk id, which the SentencePiece (byte fallback) and byte tokenizers never emit

    c.slim = slim = ml_collections.ConfigDict()
    # Model transforms applied in this order before training (and recorded in every checkpoint's
    # model spec): e.g. ("lora",). Each has its options in the section of the same name.
    slim.recipe = ()
    slim.lora = lora = ml_collections.ConfigDict()
    lora.rank = 8  # adapter rank r (at most the smaller side of every adapted kernel)
    lora.alpha = 16.0  # scaling numerator: the adapter output is multiplied by alpha / r
    lora.rslora = False  # rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023)
    lora.dropout = 0.0  # dropout on the adapter input during training
    # Regexes searched in each Dense layer's path, per layer as "blocks/3/attn/wq" (also when layers
    # are scanned): default every attention and MLP projection; "blocks/(0|1)/attn/wq" picks layers.
    lora.targets = ("attn/w[qkvo]$", "mlp/(gate|up|down)$")
    slim.prune = prune = ml_collections.ConfigDict()
    # Sparsity masks on matrix kernels, kept as transform state (sharded like their kernels): the
    # masked weights are exactly zero after every update and get no optimizer update.
    prune.targets = ("^blocks/",)  # per-layer kernel patterns; default every block projection
    # How masks change while training: "fixed" (as `slimjax prune` or the checkpoint left them;
    # dense when fresh), "gradual" (Zhu & Gupta 2017 cubic schedule from initial_sparsity to
    # sparsity between begin_step and end_step), "rigl" (Evci et al. 2020: drop by magnitude, grow
    # by gradient) or "set" (Mocanu et al. 2018: grow at random) at constant sparsity.
    prune.schedule = "fixed"
    prune.sparsity = 0.5  # target fraction of zeros (gradual: final; rigl/set: throughout)
    prune.initial_sparsity = 0.0  # gradual: sparsity at begin_step
    prune.begin_step = 0  # first step of mask updates (gradual, rigl, set)
    prune.end_step = 0  # last step of mask updates
    prune.every = 100  # steps between mask updates
    prune.drop_fraction = 0.3  # rigl/set: fraction of active weights swapped, cosine-decayed to 0 at end_step
    prune.distribution = "uniform"  # rigl/set/gradual per-layer densities: "uniform" or "erk"
    prune.l1 = 0.0  # weight of the L1 loss term sum |w| over the targeted kernels (logged as terms/l1)
    prune.seed = 0  # rigl/set/from-scratch masks: random draws (stored with the masks)
    slim.qat = qat = ml_collections.ConfigDict()
    # Quantization-aware training: the targeted kernels are seen by the loss as quantize-then-
    # dequantize (round to nearest), with a straight-through gradient; nothing extra is stored.
    qat.targets = ("^blocks/",)  # per-layer kernel patterns (as slim.prune.targets)
    qat.bits = 4  # code width: 2, 3, 4 or 8
    qat.group_size = 0  # input rows sharing a scale (must divide each targeted input dim); 0 = per output channel
    qat.symmetric = True  # symmetric codes (False: a zero point per group and output column)
    slim.quant = quant = ml_collections.ConfigDict()
    # Quantized storage: each targeted kernel is replaced by integer codes (packed two or four per
    # byte at 4 or 2 bits) plus float32 scales (and zero points), sharded like the kernel; the
    # layer dequantizes then multiplies. Frozen: nothing of it trains. Export dequantizes.
    quant.targets = ("^blocks/",)  # per-layer kernel patterns (as slim.prune.targets)
    quant.bits = 8  # code width: 2, 3, 4 or 8
    quant.group_size = 0  # input rows sharing a scale (int4: 128 is usual); 0 = per output channel
    quant.symmetric = True  # symmetric codes (False: a zero point per group and output column)
    quant.layer_bits = ()  # per-layer widths overriding bits, e.g. ("blocks/0/attn/wq=8",); 16 = keep float
    quant.pack = True  # pack 2-, 3- and 4-bit codes into bytes (False: one int8 per code)
    slim.lowrank = lowrank = ml_collections.ConfigDict()
    # Low-rank factorisation: each targeted kernel W is stored as u [*in, r] @ v [r, *out] (the
    # dense kernel removed), computed x @ u then @ v; both train. Applied to a model's own values
    # it is the truncated SVD; `factorize` (slimjax.slim.factorize) picks per-layer ranks and may
    # whiten by calibration activations. Export multiplies u @ v back into a plain kernel.
    lowrank.targets = ("^blocks/",)  # per-layer kernel patterns (as slim.prune.targets)
    lowrank.rank = 0  # rank of every targeted layer not named in ranks (0: those stay dense)
    lowrank.ranks = ()  # per-layer ranks, e.g. ("blocks/0/attn/wq=16",); layers of one scanned stack share one
    slim.distill = distill = ml_collections.ConfigDict()
    # Knowledge distillation: the teacher's forward pass runs inside the student's step (no
    # gradients); its parameters are transform state, sharded by the same rules and checkpointed.
    distill.teacher = ""  # the teacher's run directory (a trained or imported run; same tokenizer)
    distill.teacher_spec = ""  # the teacher's model spec as JSON ("" = read from the teacher's checkpoint)
    distill.temperature = 2.0  # softmax temperature T of the soft targets (the KL term is scaled by T^2)
    distill.alpha = 0.5  # weight of the KL term; the hard-label next-token loss is scaled by 1 - alpha
    distill.mse_probs = 0.0  # beta: weight of MSE(softmax(z_s/T), softmax(z_t/T)), mean over the vocabulary
    distill.mse_logits = 0.0  # gamma: weight of MSE(z_s, z_t), mean over the vocabulary
    distill.hidden = 0.0  # weight of MSE between last hidden states (a learned projection when widths differ)
    distill.top_k = 0  # KL over the teacher's k most likely tokens only (0: the whole vocabulary)

    slim.classify = classify = ml_collections.ConfigDict()
    # Sequence classification: a `classifier` head (kernel, bias) on the model's pooled features
    # (the decoder: its last non-padding token) trained by the `cls` cross-entropy term instead of
    # next-token prediction. Needs labelled data.sources ("genre", or "labels:GLOB" JSON Lines with
    # text and label). With LoRA put "lora" first: ("lora", "classify") trains adapters and the head.
    classify.classes = ()  # class names; every label in the data must be one of them

    c.distributed = dist = ml_collections.ConfigDict()
    # Multi-process runs (jax.distributed.initialize, before any other JAX call). Empty/-1 values
    # fall back to SLIMJAX_COORDINATOR_ADDRESS / SLIMJAX_NUM_PROCESSES / SLIMJAX_PROCESS_ID, then to auto.
    dist.coordinator_address = ""  # "host:port" of process 0's coordinator ("" = environment or auto)
    dist.num_processes = -1  # processes in the run (-1 = environment or auto)
    dist.process_id = -1  # this process's index in [0, num_processes) (-1 = environment or auto)
    dist.local_device_ids = ()  # accelerators this process uses (() = all visible; SLURM one-task-per-GPU: its own)
    dist.auto = True  # detect Cloud TPU VMs (JAX's own detection) and SLURM jobs (SLURM_* variables)
    dist.coordinator_port = 0  # SLURM: coordinator port on the first node (0 = derived from SLURM_JOB_ID)
    dist.timeout_s = 300  # seconds to wait for the coordinator and every process to connect
    dist.cpu_devices = 0  # CPU only: local CPU devices per process (jax_num_cpu_devices; 0 = JAX's default)
    return c
