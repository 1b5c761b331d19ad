"""Defaults shared by every DPDM config (method.md): Adam 3e-4, EMA 0.999, C = 1, DDIM 50 steps."""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # -1: a fresh SECRET seed per run (the guarantee needs secret noise and batches), kept in
    # the private checkpoints; >= 0: fixed and known, for tests and debugging only.
    config.seed = -1

    config.data = data = ml_collections.ConfigDict()
    # mnist | fashion_mnist | cifar10 | celeba32 | celeba64 | imagenet32 | synthetic | folder | npz
    data.name = "mnist"
    data.data_dir = ""  # "" -> $DPDM_DATA_DIR or ~/.cache/dpdm_jax/data
    data.fetch = True  # MNIST / Fashion-MNIST may be fetched when missing ($DPDM_DATA_NO_FETCH=1: False)
    data.tfds_dir = ""  # a prepared tensorflow-datasets directory to search first ("" -> $TFDS_DATA_DIR)
    data.conditional = True  # class-conditional (label dropout for guidance)
    data.max_examples = 0  # > 0: use only the first examples (smoke tests); N is then that size
    # Only for your own images (docs/data.md): data.name == "folder" (one subfolder of PNG/JPEG/WebP
    # per class, or none: unlabelled) or "npz" (uint8 `images` (N, H, W, C), optional `labels`).
    data.path = ""  # the folder or the .npz file
    data.image_size = 0  # centre crop + resize to this square side; folder: required; npz: 0 = as stored
    data.channels = 0  # 1 (grayscale) or 3 (RGB); folder: required; npz: 0 = as stored
    # Only for data.name == "synthetic" (tests / smoke runs).
    data.synthetic_size = 256
    data.synthetic_image_size = 28
    data.synthetic_channels = 1
    data.synthetic_num_classes = 10

    config.model = model = ml_collections.ConfigDict()
    model.nf = 32
    model.ch_mult = (1, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (7,)
    model.dropout = 0.0
    # How convolutions are computed (speed only: same parameters and values), one of
    # dpdm_jax.models.layers.CONV_IMPLS; "auto" picks by backend (docs/benchmarks.md).
    model.conv_impl = "auto"

    config.diffusion = diffusion = ml_collections.ConfigDict()
    diffusion.parameterisation = "edm"  # vp | ve | v | edm
    diffusion.noise_multiplicity = 32  # K draws averaged per example before clipping
    diffusion.label_dropout = 0.1
    # EDM only: training noise levels ln(sigma) ~ N(edm_p_mean, edm_p_std^2) (Karras et al.'s P_mean, P_std).
    diffusion.edm_p_mean = -1.2
    diffusion.edm_p_std = 1.2

    config.dp = dp = ml_collections.ConfigDict()
    # False: the non-private baseline (no clipping, no noise); every output then says NO PRIVACY.
    dp.enabled = True
    dp.epsilon = 10.0
    dp.delta = 1e-5
    dp.clip_norm = 1.0
    dp.batch_size = 4096  # nominal: q = 1 / ceil(N / batch_size), expected batch q * N
    dp.epochs = 300.0  # T = epochs * ceil(N / batch_size) logical steps
    dp.accountant = "rdp"  # rdp | pld
    dp.noise_multiplier = -1.0  # < 0: calibrate from epsilon; >= 0: use as given (epsilon is then reported)
    dp.allow_delta_above_1_over_n = False

    config.optim = optim = ml_collections.ConfigDict()
    optim.learning_rate = 3e-4
    optim.b1 = 0.9
    optim.b2 = 0.999
    optim.eps = 1e-8
    optim.ema_max_decay = 0.999

    config.training = training = ml_collections.ConfigDict()
    training.chunk_size = 64  # examples per physical chunk (all devices together)
    training.microbatch_size = 0  # > 0: examples per device processed at once inside a chunk
    training.max_steps = 0  # > 0: stop after this many steps (the run's guarantee is for steps done)
    training.log_every = 10
    training.checkpoint_every = 100
    training.sample_every = 500  # PNG grid of EMA samples every N steps and at the end (0: end only, <0: never)
    training.num_grid_samples = 64
    training.keep_checkpoints = 3
    training.fid_every = 0  # > 0: FID of fid_num_samples EMA samples every this many steps
    training.fid_num_samples = 1000
    # > 0: every N steps (and at the end) label accuracy of label_accuracy_num_samples balanced EMA
    # samples by the cached real-data classifier (conditional MNIST / Fashion-MNIST; outside the guarantee)
    training.label_accuracy_every = 0
    training.label_accuracy_num_samples = 200

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.sampler = "ddim"  # ddim | ddim_stochastic | edm
    sampling.num_steps = 50
    sampling.guidance_weight = 0.0
    sampling.s_churn = 0.0
    sampling.s_min = 0.05
    sampling.s_max = 50.0
    sampling.s_noise = 1.0
    sampling.num_samples = 64
    sampling.batch_size = 256
    sampling.labels = "balanced"  # balanced | uniform | <class index>
    sampling.checkpoint_step = -1  # -1: latest
    # A release directory (--mode=export): sample from it alone, no checkpoint or data needed.
    sampling.release = ""
    # The sampling randomness: -1 a fresh seed from the OS, >= 0 reproducible. Public (it is
    # written to the samples' manifest) and independent of the training seed.
    sampling.seed = -1
    sampling.write_png = False  # also an ImageFolder PNG tree samples/step<k>/<class>/<i>.png

    # --mode=export: a publishable release (EMA weights, model.json, manifest.json; no seed).
    config.export = export = ml_collections.ConfigDict()
    export.step = -1  # the checkpoint step to export; -1: the latest
    export.dir = ""  # "" -> WORKDIR/release; an existing non-empty directory is refused

    config.eval = ev = ml_collections.ConfigDict()
    ev.num_samples = 60000
    ev.fid_batch_size = 100
    ev.fid_reference_images = 0  # 0: the whole train split (the paper); > 0: its first N (CPU smoke runs)
    ev.classifier_epochs = 50
    ev.classifiers = ("logreg", "mlp", "cnn")
    ev.inception_weights = ""  # "" -> $DPDM_INCEPTION_NPZ or ~/.cache/dpdm_jax/inception_fid.npz
    ev.fid_stats_dir = ""  # FID/KID reference cache of the public datasets; "" -> $DPDM_FID_STATS_DIR or ~/.cache/dpdm_jax/fid_stats
    ev.fid = True  # FID of the samples vs the train statistics (Inception features: slow on a CPU)
    ev.kid = True  # KID (unbiased MMD^2 of Inception features) next to FID
    ev.kid_reference_images = 2000  # raw features of the first N train images (cached), capped at N
    ev.kid_num_subsets = 100
    ev.label_accuracy = True  # conditional models: a real-data CNN labels the samples
    ev.label_classifier_epochs = 2  # its training (cached per recipe); MNIST: ~98% test accuracy
    return config
