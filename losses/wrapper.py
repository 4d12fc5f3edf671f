"""LossWrapper: the shared base of the plug-ins that modify another loss (STF's targets, AOT's noise pairing).

A wrapper holds its base loss (built from `base_kwargs`, EDM's loss by default) and passes through what it does
not change: the process, the batch source, the data checks and the capability flags (uses_loop_lr_ramp,
feeds_augment_labels). Wrappers nest (AOT over STF over EDM) and are registered in losses.LOSS_WRAPPERS with the
train.py flags that turn them on.
"""

import collections.abc

import dnnlib

DEFAULT_BASE = dict(class_name='losses.denoising.EDMLoss')


class LossWrapper:
    """A loss built around `self.base`; subclasses override __call__ and, when they need other data, batch_source."""

    def __init__(self, base_kwargs=None):
        if base_kwargs is not None and not isinstance(base_kwargs, collections.abc.Mapping):
            # dict() of pairs or of an array would hide the class name from the checks of a loaded pickle
            raise TypeError(f"{type(self).__name__}: base_kwargs must be a mapping (class_name and options), not a "
                            f"{type(base_kwargs).__name__}")
        self.base_kwargs = dict(base_kwargs) if base_kwargs is not None else dict(DEFAULT_BASE)
        self.base = dnnlib.util.construct_class_by_name(**self.base_kwargs)

    @property
    def process(self):
        return self.base.process

    # The base's capability flags (class attributes a loss may declare, read by train.py and the loop on the loss
    # they are given), with the default where the base declares none: a wrapper changes none of them.
    @property
    def uses_loop_lr_ramp(self) -> bool:
        return getattr(self.base, 'uses_loop_lr_ramp', True)

    @property
    def feeds_augment_labels(self) -> bool:
        return getattr(self.base, 'feeds_augment_labels', True)

    def batch_source(self, data, inner):
        return self.base.batch_source(data, inner)

    def check_data(self, *, batch_gpu_total: int, batch_gpu: int, dataset_size: int) -> list[str]:
        return self.base.check_data(batch_gpu_total=batch_gpu_total, batch_gpu=batch_gpu, dataset_size=dataset_size)

    def check_network(self, *, img_resolution: int, img_channels: int, label_dim: int) -> list[str]:
        check = getattr(self.base, 'check_network', None)
        return [] if check is None else check(img_resolution=img_resolution, img_channels=img_channels,
                                              label_dim=label_dim)

    def __call__(self, net, batch, augment_pipe=None):
        return self.base(net, batch, augment_pipe=augment_pipe)

    def require_hooks(self, loss, hooks, flag: str, needs: str, kind: str = '') -> None:
        """TypeError naming the wrapper's flag and the base loss as the user chose it (--loss=NAME) when `loss`
        lacks one of `hooks`: caught when the wrapper is built, before any run directory exists. `needs` says what
        the wrapper needs, e.g. 'STF targets need a denoising loss'."""
        missing = [hook for hook in hooks if not hasattr(loss, hook)]
        if not missing:
            return
        from losses import LOSSES  # losses/__init__.py imports the wrappers
        names = [name for name, cls in LOSSES.items() if type(loss) is cls]
        usable = [name for name, cls in LOSSES.items() if all(hasattr(cls, hook) for hook in missing)]
        which = f'--loss={names[0]}' if names else f'the loss {type(loss).__name__}'
        raise TypeError(f'{flag}: {needs} ({", ".join(usable)}); {which} is not one (it lacks the '
                        f'{kind + " " if kind else ""}hooks {", ".join(missing)})')

    def innermost(self):
        """The base loss at the bottom of a chain of wrappers."""
        loss = self.base
        while isinstance(loss, LossWrapper):
            loss = loss.base
        return loss
