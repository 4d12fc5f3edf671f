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
}

PRECOND_CLASSES = {'vp': 'training.preconditioning.VPPrecond', 've': 'training.preconditioning.VEPrecond',
                   'edm': 'training.preconditioning.EDMPrecond'}
