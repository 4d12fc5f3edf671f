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

TRAIN_PRESETS = {**GDD_PRESETS}
PRESET_PROCESSES = 4  # GPUs of the published runs above


def preset_command(name: str, outdir: str = 'training-runs') -> str:
    """The train.py command line of TRAIN_PRESETS[name] (torchrun on the published number of GPUs)."""
    args = [f'--outdir={outdir}']
    for key, value in TRAIN_PRESETS[name].items():
        flag = '--' + key.replace('_', '-')
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            item = int(item) if isinstance(item, bool) else item
            args.append(f'{flag}={item}')
    return f'torchrun --standalone --nproc_per_node={PRESET_PROCESSES} train.py ' + ' '.join(args)
