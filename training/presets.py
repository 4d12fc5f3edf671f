"""Named configurations of the networks train.py builds (EDM's --arch and --precond), as data.

Benchmarks and tests import them from here rather than from train.py (nothing below the CLIs imports a CLI).
"""

ARCH_PRESETS = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                   decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2]),
    'adm': dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4]),
    # guided-diffusion's CIFAR-10 UNet as SPD (and iDDPM) train it: 128 channels, (1, 2, 2, 2), 3 blocks, attention
    # at 16 and 8 (4 heads of 64 channels), scale-shift norm; pass --dropout=0.3. What differs: README, SPD.
    'adm-cifar': dict(model_type='DhariwalUNet', model_channels=128, channel_mult=[1, 2, 2, 2], num_blocks=3,
                      attn_resolutions=[16, 8]),
}

PRECOND_CLASSES = {'vp': 'training.preconditioning.VPPrecond', 've': 'training.preconditioning.VEPrecond',
                   'edm': 'training.preconditioning.EDMPrecond', 'gdd': 'training.preconditioning.GDDPrecond',
                   'eps': 'training.preconditioning.EpsPrecond'}

# ---------------------------------------------------------------------------------------------------------------------
# Published training configurations, as train.py options (a table: train.py --help prints each as a command line).

_EDM_PRETRAINED = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained'
_GDD_COMMON = dict(loss='gdd', precond='gdd', dropout=0, augment=0, fp16=True, seed=42, tick=25, snap=10, ema=0.5,
                   lr_rampup=0)
_GDD_CIFAR = dict(_GDD_COMMON, data='datasets/cifar10-32x32.zip', batch=256, lr=1e-4, duration=5,
                  loss_opt=('d_lr=0.0001', 'backbones=vgg16_bn,tf_efficientnet_lite0'))
_GDD_64 = dict(_GDD_COMMON, batch=256, lr=2e-5, duration=10,
               loss_opt=('d_lr=4e-05', 'backbones=deit_base_distilled_patch16_224,tf_efficientnet_lite0'))

# GDD (Zheng & Yang 2024; Zyriix/GDD train.sh, 4 GPUs): a one-step generator fine-tuned from EDM's pickles (their
# EMA), --lr for G, d_lr for D, R1 gamma 1e-4 every 16, EMA half-life min(--ema, 5% of the images seen). The -i
# variants are GDD-I (freeze=1). The reference ran 4 GPUs: G/D losses are summed per GPU (batch_sum), so R1's weight
# relative to them follows the per-GPU batch; keep 4 processes (or batch_gpu 64) to keep its balance.
GDD_PRESETS = {
    'gdd-cifar10-uncond': dict(_GDD_CIFAR, cond=False, init=f'{_EDM_PRETRAINED}/edm-cifar10-32x32-uncond-ve.pkl'),
    'gdd-cifar10-cond': dict(_GDD_CIFAR, cond=True, init=f'{_EDM_PRETRAINED}/edm-cifar10-32x32-cond-ve.pkl'),
    'gdd-afhqv2': dict(_GDD_64, cond=False, data='datasets/afhqv2-64x64.zip',
                       init=f'{_EDM_PRETRAINED}/edm-afhqv2-64x64-uncond-ve.pkl'),
    'gdd-ffhq': dict(_GDD_64, cond=False, data='datasets/ffhq-64x64.zip',
                     init=f'{_EDM_PRETRAINED}/edm-ffhq-64x64-uncond-ve.pkl'),
    'gdd-imagenet': dict(_GDD_64, cond=True, data='datasets/imagenet-64x64.zip', batch=512, lr=8e-6, ema=50,
                         init=f'{_EDM_PRETRAINED}/edm-imagenet-64x64-cond-adm.pkl'),
}
GDD_PRESETS.update({name.replace('gdd-', 'gdd-i-', 1): dict(preset, loss_opt=(*preset['loss_opt'], 'freeze=1'))
                    for name, preset in list(GDD_PRESETS.items())})

# EDM (Karras et al. 2022): Table 2's final configurations as its README gives them (NVlabs/edm; 8 GPUs, ImageNet 32).
# CIFAR-10 needs no option beyond the defaults; the ablation configurations A-E of Table 2 change the architecture
# and the original codebases' training setup beyond these options (only F, the final one, is expressible: these).
# 'vp' / 've' in the names are the paper's column labels, as in its pickles' names (edm-*-vp.pkl / -ve.pkl): the
# DDPM++ / NCSN++ architectures, both trained with EDM's preconditioning and loss (NVlabs/edm README: `--cond=1
# --arch=ddpmpp`, --precond left at its default, edm). --precond=vp|ve would train Song et al.'s VP/VE objectives,
# Table 2's baseline columns, not its configuration F.
_CIFAR = dict(data='datasets/cifar10-32x32.zip')
EDM_PRESETS = {
    'edm-cifar10-cond-vp': dict(_CIFAR, cond=True, arch='ddpmpp', precond='edm'),
    'edm-cifar10-cond-ve': dict(_CIFAR, cond=True, arch='ncsnpp', precond='edm'),
    'edm-cifar10-uncond-vp': dict(_CIFAR, cond=False, arch='ddpmpp', precond='edm'),
    'edm-cifar10-uncond-ve': dict(_CIFAR, cond=False, arch='ncsnpp', precond='edm'),
    'edm-ffhq-vp': dict(data='datasets/ffhq-64x64.zip', cond=False, arch='ddpmpp', precond='edm', batch=256,
                        cres=[1, 2, 2, 2], lr=2e-4, dropout=0.05, augment=0.15),
    'edm-ffhq-ve': dict(data='datasets/ffhq-64x64.zip', cond=False, arch='ncsnpp', precond='edm', batch=256,
                        cres=[1, 2, 2, 2], lr=2e-4, dropout=0.05, augment=0.15),
    'edm-afhqv2-vp': dict(data='datasets/afhqv2-64x64.zip', cond=False, arch='ddpmpp', precond='edm', batch=256,
                          cres=[1, 2, 2, 2], lr=2e-4, dropout=0.25, augment=0.15),
    'edm-afhqv2-ve': dict(data='datasets/afhqv2-64x64.zip', cond=False, arch='ncsnpp', precond='edm', batch=256,
                          cres=[1, 2, 2, 2], lr=2e-4, dropout=0.25, augment=0.15),
    'edm-imagenet64-adm': dict(data='datasets/imagenet-64x64.zip', cond=True, arch='adm', precond='edm', duration=2500,
                               batch=4096, lr=1e-4, ema=50, dropout=0.10, augment=0, fp16=True, ls=100, tick=200),
}

# STF (Xu et al. 2023, Newbeeer/stf README): EDM's CIFAR-10 uncond settings with 1024 references per GPU (8 GPUs).
STF_PRESETS = {
    'stf-cifar10-uncond-ncsnpp': dict(_CIFAR, cond=False, arch='ncsnpp', precond='edm', stf=True, stf_refs=1024),
    'stf-cifar10-uncond-ddpmpp': dict(_CIFAR, cond=False, arch='ddpmpp', precond='edm', stf=True, stf_refs=1024),
}

# AOT (Kim et al. 2024, large-scale-kim/EDM-AOT): pools of 512 images per GPU unconditional, 2048 conditional; EDM's
# CIFAR-10 settings otherwise. Sample with generate.py --preset=aot-uncond / aot-cond (rho 90 / 72).
AOT_PRESETS = {
    'aot-cifar10-uncond': dict(_CIFAR, cond=False, arch='ncsnpp', precond='edm', batch=256, aot=512),
    'aot-cifar10-cond': dict(_CIFAR, cond=True, arch='ncsnpp', precond='edm', batch=256, aot=2048),
}

# SPD (Das, Fotiadis et al. 2023, mtkresearch/shortest-path-diffusion configs/cifar10_fourier.yml and README): guided-
# diffusion's CIFAR-10 UNet, AdamW lr 1e-4 without decay or ramp, EMA 0.9999 per step from the first step (at batch
# 1024 a half-life of 1024 ln 0.5 / ln 0.9999 images = 7.0975 Mimg, no ramp-up), dropout 0.3, random flips, fp32,
# T = 4000; its DDPM control is the same with the linear-beta process. The training length is not published: EDM's
# 200 Mimg default stays.
_SPD_CIFAR = dict(_CIFAR, cond=False, arch='adm-cifar', batch=1024, lr=1e-4, lr_rampup=0, ema=7.0975, ema_rampup=0,
                  dropout=0.3, augment=0, xflip=True, precision='fp32')
SPD_PRESETS = {
    'spd-cifar10': dict(_SPD_CIFAR, loss='spd'),
    'ddpm-cifar10': dict(_SPD_CIFAR, loss='ddpm'),
}

TRAIN_PRESETS = {**EDM_PRESETS, **STF_PRESETS, **AOT_PRESETS, **GDD_PRESETS, **SPD_PRESETS}

# What a preset set before a correction, for the runs made then: such a run resumes with it (training/resume.py),
# where the preset's current value would make it another run. Before 2026-12-03 the edm-*-vp / -ve presets trained
# Song et al.'s VP / VE objectives (--precond=vp / ve), EDM's preconditioning since.
EARLIER_PRESET_VALUES = {name: dict(precond=name.rsplit('-', 1)[1]) for name in EDM_PRESETS
                         if name.endswith(('-vp', '-ve'))}
# Names taken out, with the preset that has their settings (a job script of an earlier version names them).
REMOVED_PRESETS = {'edm-cifar10-cond-edm': 'edm-cifar10-cond-vp', 'edm-cifar10-uncond-edm': 'edm-cifar10-uncond-vp'}
PRESET_PROCESSES = 4  # GPUs of the published GDD runs (the default below)
PRESET_GPUS = {**{name: 8 for name in (*EDM_PRESETS, *STF_PRESETS)}, 'edm-imagenet64-adm': 32,
               **{name: 4 for name in AOT_PRESETS}, **{name: 8 for name in SPD_PRESETS}}
PRESET_SOURCES = {
    **{name: 'EDM (Karras et al. 2022), Table 2 / NVlabs/edm README' for name in EDM_PRESETS},
    **{name: 'STF (Xu et al. 2023), Newbeeer/stf README' for name in STF_PRESETS},
    **{name: 'AOT (Kim et al. 2024), large-scale-kim/EDM-AOT README' for name in AOT_PRESETS},
    **{name: 'GDD (Zheng & Yang 2024), Zyriix/GDD train.sh' for name in GDD_PRESETS},
    'spd-cifar10': 'SPD (Das, Fotiadis et al. 2023), mtkresearch/shortest-path-diffusion configs/cifar10_fourier.yml '
                   '+ README (batch 1024)',
    'ddpm-cifar10': 'SPD (Das, Fotiadis et al. 2023): its DDPM control (image_train.py, linear beta, the same UNet)',
}

# generate.py / fid.py calc --network --preset: published sampler settings (generate.py option names and values; a
# preset fills the options the command line does not give: samplers.cli_options.apply_preset). The rest is generate.py's
# defaults: Heun, --schedule=edm, rho 7, sigma 0.002 ... 80, EDM's appended sigma = 0.
SAMPLER_PRESETS = {
    'edm-cifar10': dict(steps=18),                                  # Heun, 35 NFE
    'edm-ffhq': dict(steps=40),                                     # 79 NFE
    'edm-afhqv2': dict(steps=40),
    'edm-imagenet64': dict(steps=256, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003),  # 511 NFE, stochastic
    'aot-uncond': dict(steps=14, rho=90),                           # 27 NFE
    'aot-cond': dict(steps=15, rho=72),                             # 29 NFE
    # LD3's CIFAR-10 teacher (what ld3.py gen-data samples by default): UniPC-3 bh1, 20 steps on edm rho 7 ending at
    # sigma_min (20 NFE). LD3's learned grids are schedule files (ld3.py train): --schedule=FILE, not presets.
    'ld3-teacher': dict(solver='unipc', steps=20, end='sigma_min', order=3, variant='bh1'),
}
SAMPLER_PRESET_SOURCES = {
    **{name: 'EDM (Karras et al. 2022), Section 5 / NVlabs/edm README' for name in SAMPLER_PRESETS
       if name.startswith('edm')},
    'aot-uncond': 'AOT (Kim et al. 2024), README: Heun, rho 90, 14 steps',
    'aot-cond': 'AOT (Kim et al. 2024), README: Heun, rho 72, 15 steps',
    'ld3-teacher': 'LD3 (Tong et al. 2025), README / configs/cifar10.yml: UniPC order 3 bh1, 20 steps, edm rho 7, '
                   'no final denoise',
}


def preset_command(name: str, outdir: str = 'training-runs') -> str:
    """The train.py command line of TRAIN_PRESETS[name] (torchrun on the published number of GPUs)."""
    args = [f'--outdir={outdir}']
    for key, value in TRAIN_PRESETS[name].items():
        flag = '--' + key.replace('_', '-')
        if isinstance(value, list):  # a comma list (--cres); a tuple is a repeated option (--loss-opt)
            value = ','.join(str(v) for v in value)
        for item in (value if isinstance(value, tuple) else [value]):
            item = int(item) if isinstance(item, bool) else item
            args.append(f'{flag}={item}')
    gpus = PRESET_GPUS.get(name, PRESET_PROCESSES)
    return f'torchrun --standalone --nproc_per_node={gpus} train.py ' + ' '.join(args)
