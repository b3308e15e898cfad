"""Every default of every script, written once: edit a value here to change what a script does
(as with the reference code's config.py); a command-line flag overrides it for one run.

A script reads the groups listed for it in cli.SCRIPTS; `python <script> --help` shows each option
with the value it gets from here. Where a checkpoint's meta says what a model or its attack is,
the meta wins over these values and a flag wins over both. Optimisation numbers are the reference
code's (NAD: bboylyg/NAD, ARGD: BililiCode/ARGD, MCL: Zhihao151/MCL) unless a comment says otherwise.
"""

# ============================================================================ every script
COMMON = dict(
    dataset='CIFAR10',         # CIFAR10, CIFAR100, GTSRB, or ImageFolder (any <root>/{train,test}/<class>/*)
    data_root='./data',        # the data set (downloaded here if absent), or an image-folder tree, used offline
    seed=0,                    # fixes data subsets, poisoned indices, augmentation and initialisation
    device=None,               # None: cuda when available, else cpu
    threads=None,              # CPU threads for torch; None: torch chooses
    precision='auto',          # auto: what ran fastest (bf16 on AMX/AVX512-BF16 CPUs; fp32 on TF32 GPUs; fp16 on 7.x); or fp32, bf16, fp16
    eval_batch_size=None,      # None: EVAL_BATCH_SIZE for the device
    json=False,                # print the final summary as one JSON object
    deterministic=False,       # CUDA: deterministic cuDNN kernels and algorithms (the CPU needs none)
    cuda_graphs='off',         # on: fixed-shape fp32 calls replayed as CUDA graphs (cuda_graphs.py); off until measured on a GPU
)
# --cuda_graphs on: graphs kept per model (a kind each: train step, features step, eval batch, its ragged last
# batch, the teacher's call...: a defense needs 2-6); beyond, new kinds run eagerly rather than hold more GPU memory
CUDA_GRAPHS = dict(max_graphs=8, warmup=3)  # warmup: eager calls before a capture (make_graphed_callables' default)
EVAL_BATCH_SIZE = dict(cpu=256, cuda=1000)  # 256 beat 1000 on the CPU in every paired run

# ============================================================================ the model and its attack
# Used where no checkpoint meta says otherwise (and by train_badnet.py to build one).
MODEL = dict(
    arch='WRN-16-1',           # see models.MODELS
    num_class=None,            # None: the data set's
    image_size=None,           # None: the data set's (32); image folders are resized to it
    normalize=None,            # 'cifar', 'none' (raw [0,1]) or 'm1,m2,m3,s1,s2,s3'; None: the recipe's, else the data set's
)
ATTACK = dict(
    trigger_type='gridTrigger',  # see triggers.TRIGGERS and the README's attack list
    target_type='all2one',     # all2one, all2all, or cleanLabel (only target-class images are poisoned, labels kept)
    target_label=0,            # the attack's target class
    inject_portion=0.1,        # poisoned fraction of the training set (cleanLabel: of the target class); 0 = clean control
    trig_w=3,                  # squareTrigger rows
    trig_h=3,                  # squareTrigger columns
    trigger_path=None,         # trojanTrigger: .npz added or an image stamped (required); blendedTrigger: an image (None: fixed noise); refoolTrigger: another data set's folder
)

# The label-consistent attack (lcTrigger; Turner, Tsipras & Madry 2019): only target-class training images are
# poisoned and keep their labels; each is first pushed away from its class by PGD on an adversarially robust
# model (label_consistent.py), then stamped with the four-corner trigger. Test images carry the trigger only.
LABEL_CONSISTENT = dict(
    amplitude=255,             # trigger: +-255 on each 3x3 corner pattern, clipped (the paper's full pattern, black and white); the
                               # reduced +-32 of the official README left the zoo's ASR at 1.85 after 21 of 40 epochs here
    eps=8,                     # PGD bound, /255 L_inf (the PyTorch reference's craft.yaml, the paper's eps 8)
    step=1.5,                  # PGD step, /255 (craft.yaml)
    steps=100,                 # PGD steps (craft.yaml)
    craft_batch=512,           # images per PGD batch (craft.yaml's loader)
    # the robust model: PGD adversarial training as the paper's (Madry et al.) and the PyTorch reference's (its model
    # from locuslab/fast_adversarial's train_pgd.py), the zoo's architecture on the clean training set; the zoo's first
    # LC models used FGSM from a random start (robust_steps=1, robust_alpha=10: train_fgsm.py)
    robust_epochs=15,          # train_pgd.py
    robust_lr=0.2,             # its cyclic schedule's peak, reached mid-run (0 at both ends), here set per epoch
    robust_batch=128,          # train_pgd.py
    robust_weight_decay=5e-4,  # train_pgd.py
    robust_eps=8,              # /255, train_pgd.py
    robust_steps=7,            # PGD steps per training batch, from a random start (train_pgd.py's attack-iters)
    robust_alpha=2,            # PGD step /255, train_pgd.py
    robust_check=1000,         # test images its clean and PGD accuracy are reported on
    robust_check_steps=10,     # PGD steps of that check (step 2/255: train_fgsm.py's pgd_alpha)
)

# Refool, the reflection backdoor (refoolTrigger; Liu et al., ECCV 2020, DreamtaleCore/Refool): reflection layers
# made from another data set's images (the paper's PascalVOC cannot be downloaded here: --trigger_path names it),
# the candidates chosen by their measured effect, blended into a share of the target class's images (labels kept)
REFOOL = dict(
    candidates=200,            # reflection candidates the strategy weighs (strategy.py's n_images)
    rounds=3,                  # strategy rounds, each training a proxy model (the reference's 16: a 2-core CPU)
    proxy_epochs=5,            # epochs of each round's proxy model (the zoo's recipe, its milestones scaled)
    proxy_test=2000,           # non-target test images each round scores the reflections on
    scale=560,                 # reflections are made at this size, scene and source resized to it (blend_images' max_image_size)
    ghost_rate=0.39,           # share of ghost reflections, the rest out of focus (gen_main_func's ghost_rate)
    alpha_t=(0.55, 0.95),      # transmission weight, 1 - U(0.05, 0.45) (insert_reflection.py)
    sigma=(1.0, 5.0),          # out-of-focus model: Gaussian blur sigma range, pixels at the 560-px scale
    offset=(3, 8),             # ghost model: shift of the second reflection, pixels per axis at the 560-px scale
    ghost_alpha=(0.15, 0.5),   # ghost model: weight of one copy, |switch - U(0.15, 0.5)|
    gamma=2.2,                 # reflections are added in linear light
    brightest=0.1,             # a candidate's blended image must reach 10% of full brightness
    reflection_share=0.8,      # ... and its reflection layer stay below 0.8x the rest's mean (the transmission dominates)
    ssim=(0.70, 0.85),         # ... and its SSIM to the transmission layer lie in this band (not too alike, not too far)
)

# ============================================================================ every training script
TRAINING = dict(
    eval_every=1,              # score the test sets every k epochs (always after the last)
    eval_subset=2000,          # per-epoch rows score a fixed random N images of each test set (0 = all)
    log_root='./logs',         # per-run CSV logs go here
    checkpoint_root='./weight',  # models are read and written under this folder
    output=None,               # the final model; None: the script's own place under checkpoint_root
    resume=False,              # continue an interrupted run from its <output>.resume file
)

# ============================================================================ train_badnet.py
TRAIN_BADNET = dict(
    recipe='mcl',              # a reference code's training recipe, see BADNET_RECIPES
    epochs=15,                 # MCL trains 100; 15 with its milestones scaled fit a 2-core CPU (the zoo used 40)
    batch_size=64,             # NAD and MCL both train with 64
    lr=0.1,                    # initial learning rate; the recipe's milestones divide it
    momentum=0.9,              # SGD momentum (NAD and MCL)
    weight_decay=1e-4,         # NAD and MCL
    no_augment=False,          # drop the recipe's random crop and flip
    compile='auto',            # torch.compile: auto = on the CPU where a compiler is found (bf16: 29.6 -> 24.3 s/epoch); eager on CUDA (H200: 21% slower)
    continue_from=None,        # a final model of this run's options with fewer epochs: train on from its epoch (momentum restarts)
)
# milestones are fractions of --epochs where the lr is multiplied by the next factor (milestone_epochs:
# epochs, as a reference counts them, whatever --epochs is)
BADNET_RECIPES = {
    # MCL train_badnet.py: crop (pad 4) + flip, CIFAR mean/std, SGD momentum 0.9, lr /10 at 20% and 70%
    'mcl': dict(augment=True, normalize=None, nesterov=False, milestones=(0.2, 0.7), factors=(1, 0.1, 0.01)),
    # NAD train_badnet.py: raw [0,1] inputs, no augmentation, SGD Nesterov, lr constant over its 19 epochs
    'nad': dict(augment=False, normalize='none', nesterov=True, milestones=(), factors=(1,)),
    # WaNet as BackdoorBench trains it (attack/wanet.py, config/attack/wanet/cifar10.yaml; VinAI's reference the same
    # but 1,000 epochs): each batch warped first, then crop (pad 5) on 80%, rotation within +-10 degrees on 50%, flip;
    # its numbers (below) replace train_badnet.py's defaults where no flag sets them; both references' lr /10 at
    # epochs 100, 200, 300, 400 (MultiStepLR): never reached in BackdoorBench's 100, a constant lr; --epochs 130
    # runs VinAI's schedule to 30 epochs past its first decay
    'wanet': dict(augment=dict(pad=5, crop_p=0.8, degrees=10, rotate_p=0.5), poison_first=True, normalize=None,
                  nesterov=False, milestone_epochs=(100, 200, 300, 400), factors=(1, 0.1, 0.01, 0.001, 0.0001),
                  numbers=dict(epochs=100, lr=0.01, batch_size=128, weight_decay=5e-4)),
}

# ============================================================================ every defense
DEFENSE = dict(
    s_model=None,              # the model under defense; None: <checkpoint_root>/s_net/<arch>.tar
    ratio=0.05,                # the defender's clean fraction of the training set (all three papers: 5%)
    adv_share=0.2,             # share of each batch replaced at true labels by PGD or synthesised-trigger images (PAM's 20% + 1)
    milestones=(),             # a step schedule's epochs where the lr takes its next factor (entries with one set theirs)
    factors=(1,),              # ... and those factors
)
COLLAPSE_POINTS = 10          # a defense that costs more accuracy than this on the defender's clean subset is flagged
TEACHER = dict(t_model=None)  # NAD/ARGD's teacher; None: <checkpoint_root>/t_net/<s_model's name>.tar, fine-tuned (DEFENSES['ft']) first if absent
TEACHER_KEY = 'ft'            # the defense whose model is the teacher: its entry's teacher_epochs and teacher_lr make one

# MCL's trigger inversion and Neural Cleanse's target detection: main_mcl.py, and the synthesised trigger
# (--source inverted) of FT-SI, PAM-SI and ARGD-SI, which runs detection with these values
INVERSION = dict(
    mcl_target='auto',         # the target MCL is told, or auto: detect it (Neural Cleanse's rule)
    inv_epochs=100,            # trigger inversion: passes over the clean subset, as the reference counts its 100 steps
    inv_patience=0,            # stop inversion after this many passes without a smaller pattern (0 = never, as the reference)
    detect_epochs=10,          # inversion passes per class when detecting the target
    asr_bound=0.9,             # success a pattern must reach to count
    init_cost=1e-3,            # initial weight of the pattern-size penalty
    force=False,               # erase even when no target is detected (with the smallest pattern's class)
)
INVERSION_BATCH = 64          # MCL's batch: detection for a synthesised trigger runs at it (main_mcl.py: --batch_size)
INVERSION_IMAGES = 2048       # MCL's inversion: most images per stacked forward (43 GTSRB classes x 64 run in two)

# ============================================================================ the defenses, one entry each
# Every number of a defense, in one place (as airbench keeps one hyp dict); what it is (its label, blind or
# told, what it needs) is declared in its module in defenses/, which implements the key. Each key here is the
# default of the option of that name when the defense is chosen (`main_ft.py --defense <key> --help` shows
# them all); a flag overrides it for one run. The recipe's options: nesterov, optimizer ('sgd' or 'adam'),
# schedule ('step': lr * factors[i] from the i-th of the epoch milestones; 'cosine': CosineAnnealingLR
# stepped per epoch; 'curve': MCR's; 'constant'), augment (crop + flip where the data set has them, plus
# Cutout of `cutout`), drop_last (no ragged last batch: at lr 0.1 it would be one large step on a handful of
# images). The table's columns are these keys, in this order. Numbers are the references' on their networks
# unless a comment says otherwise.
FT = dict(  # NAD's teacher (NAD main.py with every beta 0), also the fine-tuning baseline: train_teacher.py
    teacher_epochs=10,         # NAD README: 5-10 epochs
    teacher_lr=0.1,            # /10 from epoch 2 (milestones)
    batch_size=64, momentum=0.9, nesterov=True, weight_decay=1e-4, optimizer='sgd',  # NAD
    schedule='step', milestones=(2, 20), factors=(1, 0.1, 0.001),  # NAD utils.adjust_learning_rate
    augment=True, drop_last=True,
    cutout=3,                  # NAD/ARGD Cutout(1, 3): a 2x2 hole; 0 = crop + flip only
)
ARGD = dict(  # Xia et al., IJCAI 2022 (BililiCode/ARGD): main-ARGD.py, distilling from FT's model
    epochs=10, lr=0.1, batch_size=64, momentum=0.9, nesterov=True, weight_decay=1e-4, optimizer='sgd',  # the paper
    schedule='step', milestones=(3, 6), factors=(1, 0.1, 0.01),  # ARGD utils.adjust_learning_rate
    augment=True, drop_last=True, cutout=3,  # its get_train_loader: crop + flip + Cutout(1, 3)
    p=2.0,                     # attention map: sum over channels of |activation|^p
    vert_weights='2000,5000,2000',  # vertex (AT) weights of groups 1, 2, 3
    w_vert=1.0,                # weight of the vertex loss
    w_edge=1.0,                # weight of the edge (relation graph) loss
    w_emb=1.0,                 # weight of the embedding (cross-layer attention) loss
    qk_dim=128,                # query/key size of the embedding loss
    train_projections=False,   # optimise the embedding's projections (the reference leaves them random)
    source='none',             # none (the paper), or inverted: a synthesised trigger on adv_share of each batch, true labels
)
NAD = dict(  # Li et al., ICLR 2021 (bboylyg/NAD): main-ARGD.py --defense nad, ARGD's recipe and teacher
    epochs=20, lr=0.1, batch_size=64, momentum=0.9, nesterov=True, weight_decay=1e-4, optimizer='sgd',  # NAD
    schedule='step', milestones=(2, 20), factors=(1, 0.1, 0.001),  # NAD utils.adjust_learning_rate
    augment=True, drop_last=True, cutout=3,  # NAD's get_train_loader
    p=2.0,                     # attention map: sum over channels of |activation|^p
    beta1=500,                 # AT weight of group 1 (NAD config.py)
    beta2=1000,                # group 2
    beta3=1000,                # group 3
    source='none',             # as ARGD's
)
MCL = dict(  # Yue et al., ACM MM 2023 (Zhihao151/MCL): main_mcl.py, after the inversion (INVERSION)
    epochs=20,                 # MCL erasing epochs
    lr=0.1, batch_size=64, momentum=0.9, nesterov=False, weight_decay=1e-4, optimizer='sgd',  # MCL
    schedule='step', milestones=(1, 10), factors=(1, 0.1, 0.01),  # MCL fine_defense_adjust_learning_rate
    augment=False, drop_last=True, cutout=0,  # MCL erases on the plain clean images
    temperature=0.5,           # contrastive logits / temperature
    keep_target=False,         # MCL-TK: no contrastive push on images the model assigns to the target, CE on clean ones
)
FT_AT = dict(  # the blind baseline: exactly FT's recipe, with the adversarial share added: main_ft.py
    epochs=FT['teacher_epochs'], lr=FT['teacher_lr'], batch_size=FT['batch_size'], momentum=FT['momentum'],
    nesterov=FT['nesterov'], weight_decay=FT['weight_decay'], optimizer=FT['optimizer'], schedule=FT['schedule'],
    milestones=FT['milestones'], factors=FT['factors'], augment=FT['augment'], drop_last=FT['drop_last'],
    cutout=FT['cutout'],
    source='pgd',              # its images: pgd (untargeted, per batch) or inverted (MCL's detection's pattern)
    adv_against='original',    # PGD attacks the model as given (original) or as it is being tuned (current)
    adv_eps=0.2,               # L_inf bound of the PGD, [0,1]-pixel units (SAU's trigger_norm)
    adv_step=0.05,             # PGD step (eps/4, random start)
    adv_steps=5,               # PGD steps (SAU's adv_steps)
)
# BTI-DBF(U) (Xu et al., ICLR 2024) btidbfu.py and its cfg.py: unlearning by Adam lr 1e-4 (no weight decay),
# batch 128, crop + flip, 30 passes in each of 5 rounds (its README)
BTIDBF = dict(epochs=150, lr=1e-4, batch_size=128, momentum=0.9, nesterov=False, weight_decay=0.0, optimizer='adam',
              schedule='constant', milestones=(), factors=(1,), augment=True, drop_last=False, cutout=0,
              bti_rounds=5,         # nround
              bti_pre_epochs=50,    # pretrain.py's preround
              bti_mask_epochs=20,   # mround
              bti_gen_epochs=30,    # uround
              bti_gen_lr=1e-3,      # gen_lr (pre-training and inversion)
              bti_mask_lr=0.01,     # the feature mask's Adam
              bti_norm_bound=0.3,   # norm_bound: image MSE, in the model's input units
              bti_feat_bound=3.0,   # feat_bound (cfg.py; an earlier one said 5)
              bti_share=0.1,        # int(0.1 * batch + 1) generated images
              rho=0.0)              # no path-aware point: plain Adam
NC_PASSES = 1000               # NC's most passes over 1000 images per class (the original's STEPS); its early stop ends each class sooner
DEFENSES = {
    'ft': FT,
    'nad': NAD,
    'argd': ARGD,
    'mcl': MCL,
    'mcl-tk': dict(MCL, keep_target=True),   # not in the paper: keeps the target class
    # ARGD with a newer defense's ingredient (not in the paper): FT-SI's synthesised trigger at true labels
    'argd-si': dict(ARGD, source='inverted'),
    'ft-at': FT_AT,
    'ft-si': dict(FT_AT, source='inverted'),  # the synthesised trigger instead of PGD
    # PAM (Min et al., NeurIPS 2024) btidbfu.py: SGD lr 0.01 momentum 0.1, batch 128, 30 epochs per round
    # (x 3 rounds there: 1 here); FT-AT's images (the paper's come from BTI-DBF's generator)
    'pam': dict(FT_AT, epochs=30, lr=0.01, batch_size=128, momentum=0.1, nesterov=False,
                weight_decay=0.0, schedule='constant', milestones=(), factors=(1,), cutout=0,
                rho=0.5),              # distance towards the backdoored weights (its ResNet-18 script; 1% of a WRN-16-1's norm)
    'btidbf': BTIDBF,
    # PAM on BTI-DBF's images as PAM's code runs it (fine_tune/BTIDBF/btidbfu.py --use_sam, defense.sh): BTI-DBF's
    # generator, 3 rounds, unlearning by SGD lr 0.01 momentum 0.1 at the path-aware point, CE only
    'pam-bti': dict(BTIDBF, epochs=90, lr=0.01, momentum=0.1, optimizer='sgd', bti_rounds=3,
                    bti_share=0.2,      # int(0.2 * batch + 1) generated images
                    rho=0.5),           # as PAM's
    # FST (Min et al., NeurIPS 2023) ft.py --ft_mode fst: SGD momentum 0.9, no weight decay, cosine over 10 epochs
    'fst': dict(epochs=10, lr=0.01, batch_size=128, momentum=0.9, nesterov=False, weight_decay=0.0, optimizer='sgd',
                schedule='cosine', augment=True, drop_last=True, cutout=0,
                alpha=0.1),            # weight of <W, W_orig> (its README command for CIFAR-10)
    # SAU (Wei et al., NeurIPS 2023) in BackdoorBench: Adam, cosine, batch 256, no augmentation, BN frozen;
    # 100 rounds there, 12 here (5 minutes on a 2-core CPU); BackdoorBench keeps the ragged last batch
    'sau': dict(epochs=12, lr=1e-4, batch_size=256, momentum=0.9, nesterov=False, weight_decay=0.0, optimizer='adam',
                schedule='cosine', augment=False, drop_last=False, cutout=0,
                adv_eps=0.2,           # L_inf bound of the shared PGD (trigger_norm), [0,1]-pixel units
                adv_steps=5,           # its steps, each of adv_eps from the corner
                sau_beta_adv=0.01,     # weight of the adversarial term in the maximisation (beta_1)
                sau_beta_shared=1.0,   # weight of the shared (JS) term (beta_2)
                sau_lmd_shared=1.0),   # weight of the shared unlearning loss beside clean CE (lmd_3; lmd_1 = 1)
    # FP, fine-pruning (Liu et al., RAID 2018) as BackdoorBench's defense/fp.py and config/defense/fp/cifar10.yaml:
    # prune 1% of the last layer's channels a step while the clean accuracy stays within 10% of the unpruned one's,
    # then fine-tune 100 epochs, SGD lr 0.01 momentum 0.9 weight decay 5e-4, cosine, batch 256, crop + flip
    'fp': dict(epochs=100, lr=0.01, batch_size=256, momentum=0.9, nesterov=False, weight_decay=5e-4, optimizer='sgd',
               schedule='cosine', milestones=(), factors=(1,), augment=True, drop_last=False, cutout=0,
               fp_acc_ratio=0.1,      # acc_ratio: the relative drop of the defender's accuracy pruning may cost
               fp_step=0.01),         # once_prune_ratio: the share of the channels pruned per step
    # CLP (Zheng et al., ECCV 2022) defense.py: data-free, u = 3 (its CIFAR-10 choice), no fine-tuning (epochs 0);
    # the recipe below is FT's, for --epochs N: the pruned model fine-tuned on the clean subset (not in the paper)
    'clp': dict(epochs=0, lr=FT['teacher_lr'], batch_size=FT['batch_size'], momentum=FT['momentum'],
                nesterov=FT['nesterov'], weight_decay=FT['weight_decay'], optimizer=FT['optimizer'], schedule=FT['schedule'],
                milestones=FT['milestones'], factors=FT['factors'], augment=FT['augment'], drop_last=FT['drop_last'],
                cutout=FT['cutout'],
                clp_u=3.0),            # prune above mean + u std of a layer's channel bounds
    # ANP (Wu & Wang, NeurIPS 2021) optimize_mask_cifar.py: masks by SGD lr 0.2 momentum 0.9, batch 128, crop + flip,
    # 2,000 iterations: 106 passes of the 5% subset's 19 full batches (2,014); pruned at mask <= 0.2 (its README)
    'anp': dict(epochs=106, lr=0.2, batch_size=128, momentum=0.9, nesterov=False, weight_decay=0.0, optimizer='sgd',
                schedule='constant', milestones=(), factors=(1,), augment=True, drop_last=True, cutout=0,
                anp_eps=0.4,           # bound of the neuron perturbations
                anp_steps=1,           # signed steps per batch
                anp_alpha=0.2,         # weight of the clean loss
                anp_threshold=0.2),    # prune neurons whose mask ends at most this
    # RNP (Li et al., ICML 2023) main.py: unlearning by SGD lr 0.01 momentum 0.9 weight decay 5e-4, /10 at passes 10
    # and 20, at most 21 passes, stopped at 20% accuracy; recovery 20 epochs of SGD lr 0.2 on the masks, alpha 0.2;
    # batch 128, crop + flip; pruned at mask <= 0.2 (ANP's threshold: RNP's code tabulates thresholds on test sets)
    'rnp': dict(epochs=20, lr=0.2, batch_size=128, momentum=0.9, nesterov=False, weight_decay=0.0, optimizer='sgd',
                schedule='constant', milestones=(), factors=(1,), augment=True, drop_last=False, cutout=0,
                rnp_ratio=0.01,        # its data: --ratio 0.01, "500 defense data" (its README), 4 steps a pass
                rnp_unlearn_lr=0.01, rnp_unlearn_epochs=20, rnp_unlearn_milestones=(10, 20),
                rnp_unlearn_weight_decay=5e-4,
                rnp_floor=0.2,         # clean_threshold: the unlearning stops at this accuracy on the subset
                rnp_alpha=0.2,         # weight of the recovery's cross-entropy
                rnp_threshold=0.2),    # prune neurons whose recovered mask is at most this
    # Neural Cleanse (Wang et al., S&P 2019), reverse engineering as VinAIResearch's neural_cleanse (Adam lr 0.1
    # betas 0.5/0.9, batch 64, cost 1e-3 x2 / 2**1.5 after 5 passes, success bound 99%, early stop 25 passes),
    # the mask's L1 norm as the paper; unlearning as the paper: 1 epoch, 20% of each batch stamped with the
    # reversed trigger at true labels (its lr is not given: BackdoorBench's NC lr 0.01); FT's SGD, crop + flip
    'nc': dict(epochs=1, lr=0.01, batch_size=64, momentum=0.9, nesterov=True, weight_decay=1e-4, optimizer='sgd',
               schedule='constant', augment=True, drop_last=True, cutout=0,  # its share: DEFENSE's adv_share, the paper's 20%
               nc_epochs=NC_PASSES,   # reverse-engineering passes per class, at most (CIFAR-10 Blended: all stop by pass 109)
               nc_images=1000,        # images per pass (the original's NB_SAMPLE)
               nc_batch_size=64, nc_init_cost=1e-3, nc_patience=5, nc_early_stop=25,
               nc_bound=0.99,         # success a mask must reach to count
               nc_lr=0.1),            # Adam on the mask and pattern
    # I-BAU (Zeng et al., ICLR 2022) defense.py's CIFAR-10 defaults: batch 100, Adam lr 0.001 on the weights, 5
    # rounds, K 5; its inner search SGD lr 10, fixed-point step 0.1, |delta|^2 weight 0.001, 1% of a batch
    # perturbed; no augmentation (its TensorDataset), every image used
    'i-bau': dict(epochs=5, lr=0.001, batch_size=100, momentum=0.9, nesterov=False, weight_decay=0.0,
                  optimizer='adam', schedule='constant', augment=False, drop_last=False, cutout=0,
                  ibau_k=5,            # fixed-point iterations of the hypergradient
                  ibau_inner_lr=10.0,  # the universal perturbation's SGD lr
                  ibau_fp_step=0.1,    # the inner problem's gradient-descent map (its GradientDescent(loss_inner, 0.1))
                  ibau_reg=0.001,      # weight of |delta|^2 in the inner loss
                  ibau_share=0.01),    # share of a batch carrying the perturbation in the outer loss
    # MCR (Zhao et al., ICLR 2020) IBM/model-sanitization backdoor-cifar train.py: Bezier curve, 3 bends (the ends
    # fixed), SGD lr 0.01 momentum 0.9, L2 1e-4 on the bend, batch 128, 100 epochs with its schedule, of the clean
    # images tiled into 10,000-image epochs (data.loaders_part_test) through its test transform (no crop, no flip,
    # every batch: its DataLoader keeps the last); the ends here: the backdoored model and FT's recipe on the part
    # of the subset the curve trains on
    'mcr': dict(epochs=100, lr=0.01, batch_size=128, momentum=0.9, nesterov=False, weight_decay=1e-4,
                optimizer='sgd', schedule='curve', augment=False, drop_last=False, cutout=0,
                mcr_epoch_images=10000,  # the reference's epoch: its 50 images tiled 200 times
                t_model=None,          # the curve's end: None = FT's recipe on the nine tenths, made beside the output
                mcr_t='auto',          # the point written as the model: auto = the first whose held-out loss is
                #                        level with that at t = 0.9, within 2 standard errors (defenses/mcr.py)
                mcr_held_out=0.1),     # share of the clean subset kept from the bend and the end to choose t on
    # STRIP (Gao et al., ACSAC 2019; garrisongys/STRIP), a run-time input filter, not an eraser: main_strip.py, its
    # own table (results/README.md), not a column of the erasers' table
    'strip': dict(strip_n=100,       # clean overlays per input (the reference's n_sample)
                  strip_frr=0.01,    # false rejection rate the threshold is set at, on the defender's clean subset (1%)
                  strip_images=2000,   # test images of each set scored (the reference's n_test), and the defender's
    #                                      images (a random sample of the subset) the threshold is set on
                  strip_threshold='quantile'),  # their empirical quantile: the paper's normal has a lighter left
    #                                      tail than theirs (it rejects 2.4% of them at a 1% setting, BadNets model)
}
DEFAULT_DEFENSE = {'train_teacher.py': 'ft', 'main-ARGD.py': 'argd', 'main_mcl.py': 'mcl',  # each script's without --defense
                   'main_ft.py': 'pam', 'main_strip.py': 'strip'}
STRIP_BATCH = 16              # STRIP's inputs per forward (x strip_n overlays: 1,600 images)


# ============================================================================ retune.py
RETUNE = dict(             # the retuning attack of Min et al. (NeurIPS 2024)
    model=None,                # the (purified) checkpoint to attack (required)
    retune_ratio=0.02,         # its share of the training set, drawn apart from the defender's subset
    poisoned=5,                # of which this many carry the model's own trigger and target label
    epochs=5,                  # SGD epochs
    lr=0.01,                   # constant
    momentum=0.9,              # SGD
    batch_size=128,
    weight_decay=0.0,          # none
)

# ============================================================================ the other scripts
EVALUATE = dict(model=None)    # the checkpoint to score (required)
INTERPOLATE = dict(            # interpolate.py: ASR along the line from the backdoored to the defended weights
    model=None,                # the defended checkpoint (required)
    start=None,                # --from: the backdoored checkpoint (required)
    points=11,                 # t = 0, 0.1, ..., 1 (Min et al.'s path)
    eval_subset=TRAINING['eval_subset'],  # images of each test set scored per point, as the per-epoch rows (0 = all)
)
ATTACK_FROM = dict(attack_from=None)  # evaluate.py/retune.py: score against the attack in this checkpoint's meta
BENCHMARK = dict(
    batch_size=64,             # training batch of the timed steps (the batch every training script uses)
    end_to_end=False,          # also time every defense end to end on the shipped model (minutes on a CPU)
    time_compiled=False,       # also time the train step under torch.compile (train_badnet.py's --compile compiles)
    defenses=None,             # --end_to_end: the defenses timed (comma-separated keys); None: every one
    pieces=True,               # time the pieces (the pipeline, train steps, inversion, evaluation)
)
TABLE = dict(table_dir='./results')  # run_table.py's and plot_curves.py's folder: table, cells, logs, pictures
RUN_TABLE = dict(
    attacks='badnet,blended,sig-cl,wanet',  # rows, see table.ATTACKS (trojan needs --trojan_pattern)
    defenses=None,             # columns; None: every one: the undefended model, each defense that changes it, the clean control
    seeds='0',                 # comma-separated defense seeds: the clean subset, teacher and initialisation
    model_seed=0,              # the backdoored models' seed (0: the zoo's models where they exist)
    shard=None,                # K/N: only the K-th (from 0) of N fixed slices of the cells (job arrays)
    workers=1,                 # worker processes here (one GPU each when there are several)
    epochs=None,               # backdoor training epochs; None: train_badnet.py's
    trojan_pattern=None,       # the trojan row's pattern: the references' best_square_trigger_cifar10.npz
    refool_source=None,        # the refool row's reflections: another data set's image folder (GTSRB for CIFAR-10)
    skip_retune=False,         # do not re-tune each cell's model (retune.py: ASR after re-tuning)
)
PLOT_CURVES = dict(
    attacks='badnet',          # one picture per attack
    seed=0,                    # which seed's logs to draw
    robustness=False,          # draw robustness.png (ASR before and after re-tuning) from table.csv instead
    dataset=None,              # None: pictures for each data set in table.csv (named with _gtsrb etc.; CIFAR10 without)
)
SHOW_TRIGGERS = dict(output='results/triggers.png')  # the gallery's PNG

# ============================================================================ data sets and normalisation
# What differs per data set; nothing else in the code assumes a class count, image size or layout.
# crop_flip: whether random crop and horizontal flip apply at all (backdoor training and defenses);
# zoo: the folder under --checkpoint_root of its backdoored models (run_table.py's rows); clean_label_target:
# the target of clean-label rows, which can poison only that class's images (GTSRB: class 2, the largest
# with 2,250; class 0 has 210), the other rows target 0; small_classes: those with the fewest training
# images, whose test accuracy table.md shows per defense (GTSRB: 210 images each; CIFAR is balanced)
DATASETS = {
    'CIFAR10': dict(classes=10, size=32, normalize='cifar', crop_flip=True, zoo='zoo', clean_label_target=0,
                    small_classes=()),
    'CIFAR100': dict(classes=100, size=32, normalize='cifar', crop_flip=True, zoo='zoo/cifar100', clean_label_target=0,
                     small_classes=()),
    # MCL's GTSRB: resized to 32x32, no crop or flip (a mirrored 'turn left' is 'turn right'), and its
    # test transform's mean/std (its training transform leaves them out: one normalisation here, both)
    'GTSRB': dict(classes=43, size=32, normalize='gtsrb', crop_flip=False, zoo='zoo/gtsrb', clean_label_target=2,
                  small_classes=(0, 19, 37)),
    'ImageFolder': dict(classes=None, size=32, normalize='none', crop_flip=True, zoo='zoo', clean_label_target=0,
                        small_classes=()),
}
NORMALIZATIONS = {'cifar': ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),  # the references' CIFAR mean/std
                  'gtsrb': ((0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669)),  # MCL's GTSRB mean/std
                  'none': ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}
