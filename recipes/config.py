"""The recipe's configuration: one dataclass, every option documented.

Each field's ``help`` metadata is its documentation (shown by ``--help``);
the defaults are the recipe: they train a network that learns. Times follow
the data's convention (seconds) for binning and the cells' (milliseconds)
for time constants, and say so in their names.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

DATASETS = ('shd', 'ssc', 'synthetic-shd')
ALGORITHMS = ('eprop', 'bptt')


def _field(default, help: str, choices=None):
  meta = {'help': help}
  if choices is not None:
    meta['choices'] = tuple(choices)
  return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Config:
  """Every option of the SHD/SSC recipe (see each field's ``help``)."""

  # Data.
  dataset: str = _field(
    'synthetic-shd',
    'dataset: shd, ssc or synthetic-shd (offline, generated on first use); '
    'ignored when --train-file is given',
    DATASETS,
  )
  train_file: str | None = _field(
    None,
    'a training file in the SHD/SSC HDF5 layout (instead of --dataset; '
    'needs --test-file)',
  )
  test_file: str | None = _field(
    None, 'the test file in the SHD/SSC HDF5 layout (with --train-file)'
  )
  valid_file: str | None = _field(
    None,
    'a validation file (optional; default: a validation set held out of '
    'the training file, by speaker where it has speakers)',
  )
  data_dir: str | None = _field(
    None,
    'where data files and caches live (default $FLAX_EPROP_DATA, else '
    '~/.cache/flax_eprop)',
  )
  synthetic_samples: int = _field(
    600, 'synthetic-shd only: number of training samples'
  )
  valid_fraction: float = _field(
    0.1,
    'fraction of the training set held out for validation when there is no '
    'validation split or file',
  )
  dt: float = _field(0.01, 'time bin and network time step (seconds)')
  max_time: float | None = _field(
    None,
    'duration kept per sample (seconds; default 1.4 for SHD, 1.0 for SSC '
    'and synthetic-shd)',
  )
  pool: int = _field(5, 'sum this many adjacent input channels (divides 700)')
  # Augmentation (training batches only).
  channel_shift: int = _field(
    3,
    'augmentation: random shift of the pooled channels, +- this many (0: off)',
  )
  time_shift: int = _field(
    5, 'augmentation: random onset shift, +- this many time bins (0: off)'
  )
  input_dropout: float = _field(
    0.1, 'augmentation: probability of zeroing an input bin (0: off)'
  )
  # Model.
  layers: int = _field(1, 'number of spiking layers (1 to 3)')
  features: int = _field(256, 'neurons per spiking layer')
  neuron: str = _field('ALIF', 'spiking neuron model', ('LIF', 'ALIF'))
  recurrent: bool = _field(True, 'recurrent synapses in the spiking layers')
  readout: str = _field(
    'LI',
    'readout: a leaky integrator (LI) or a memoryless Dense layer',
    ('LI', 'Dense'),
  )
  readout_form: str = _field(
    'bellec',
    'LI readout: scaled (v = kappa v + (1 - kappa) (W z + b)) or bellec '
    '(unscaled, y = kappa y + W z + b)',
    ('scaled', 'bellec'),
  )
  filtered_signal: bool = _field(
    False,
    "e-prop with the LI readout: filter the top spiking layer's eligibility "
    "traces by the readout's decay (Bellec's learning signal through a "
    'leaky readout, exact for that layer; about 3x the time of a step '
    'without it; off: the instantaneous signal only; no effect on bptt)',
  )
  tau_mem_ms: float = _field(50.0, 'membrane time constant (ms)')
  tau_adapt_ms: float = _field(200.0, 'ALIF adaptation time constant (ms)')
  beta: float = _field(0.07, 'ALIF adaptation strength')
  tau_readout_ms: float = _field(10.0, 'LI readout time constant (ms)')
  input_scale: float = _field(
    4.0,
    'input kernel std times sqrt(fan-in); large enough for spikes from the '
    'first step',
  )
  recurrent_scale: float = _field(
    1.0, 'recurrent kernel std times sqrt(features)'
  )
  readout_scale: float = _field(
    1.0,
    'readout kernel std times sqrt(features) (the scaled LI readout '
    'multiplies its input by 1 - exp(-dt / tau_readout): raise it there)',
  )
  target_rate_hz: float | None = _field(
    10.0, 'firing-rate regulariser target (Hz; none: no regulariser)'
  )
  rate_coefficient: float = _field(0.05, 'firing-rate regulariser weight')
  # Training.
  algorithm: str = _field(
    'eprop',
    'eprop (online e-prop gradients) or bptt (backpropagation through time) '
    'on the same model',
    ALGORITHMS,
  )
  chunk: int = _field(
    0,
    'e-prop: time steps per chunk; memory grows with it, time per step '
    'falls (0: the whole sequence as one chunk)',
  )
  epochs: int = _field(
    25, 'training epochs (SHD on 2 CPU cores: about 20-27 minutes)'
  )
  batch_size: int = _field(32, 'training batch size (all devices together)')
  eval_batch_size: int = _field(128, 'evaluation batch size')
  learning_rate: float = _field(0.02, 'peak learning rate (Adam)')
  warmup_steps: int = _field(0, 'linear learning-rate warmup steps')
  clip_norm: float = _field(1.0, 'gradient clipping: maximum global norm')
  weight_decay: float = _field(0.0, 'decoupled weight decay (AdamW; 0: Adam)')
  seed: int = _field(
    0, 'seed of the initialisation, batch order and augmentation'
  )
  on_nonfinite: str = _field(
    'stop',
    'a NaN/Inf loss or gradient: refuse the step, then stop or skip it',
    ('stop', 'skip'),
  )
  # Checkpoints, logging, devices.
  checkpoint_every: int = _field(
    50, 'save a checkpoint every this many steps (and at every epoch end)'
  )
  keep_checkpoints: int = _field(3, 'keep the last this many checkpoints')
  log_every: int = _field(10, 'write training metrics every this many steps')
  progress: bool = _field(True, 'show a progress bar per epoch')
  plots: bool = _field(True, 'write PNG plots to the workdir at the end')
  distributed: bool = _field(
    False,
    'call jax.distributed.initialize() (multi-host; settings from the '
    'environment)',
  )

  def __post_init__(self):
    validate(self)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict) -> Config:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f'unknown config options {unknown}')
    return cls(**values)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)


Algorithm = Literal['eprop', 'bptt']


def _bad(name: str, value, expected: str):
  raise ValueError(
    f'--{name.replace("_", "-")}={value!r}: expected {expected}.'
  )


def validate(c: Config) -> None:
  """Raises ``ValueError`` naming the first invalid option."""
  for f in dataclasses.fields(c):
    choices = f.metadata.get('choices')
    if choices and getattr(c, f.name) not in choices:
      _bad(f.name, getattr(c, f.name), f'one of {list(choices)}')
  if (c.train_file is None) != (c.test_file is None):
    _bad('test_file' if c.test_file is None else 'train_file', None,
         'a file: --train-file and --test-file go together')  # fmt: skip
  if c.valid_file is not None and c.train_file is None:
    _bad('valid_file', c.valid_file, 'to be used with --train-file/--test-file')
  positive_ints = ('synthetic_samples', 'pool', 'features',
                   'epochs', 'batch_size', 'eval_batch_size',
                   'keep_checkpoints', 'log_every')  # fmt: skip
  for name in positive_ints:
    value = getattr(c, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      _bad(name, value, 'a positive integer')
  for name in ('channel_shift', 'time_shift', 'warmup_steps',
               'checkpoint_every', 'chunk'):  # fmt: skip
    if not isinstance(getattr(c, name), int) or getattr(c, name) < 0:
      _bad(name, getattr(c, name), 'an integer >= 0')
  if c.filtered_signal and c.readout != 'LI':
    _bad('filtered_signal', True, 'no filter without --readout=LI (a Dense '
         'readout has no decay): pass --no-filtered-signal')  # fmt: skip
  if not 1 <= c.layers <= 3:
    _bad('layers', c.layers, '1, 2 or 3')
  if not 0 < c.valid_fraction < 1:
    _bad('valid_fraction', c.valid_fraction, 'a fraction in (0, 1)')
  if not 0 <= c.input_dropout < 1:
    _bad('input_dropout', c.input_dropout, 'a probability in [0, 1)')
  positive = ('dt', 'tau_mem_ms', 'tau_adapt_ms', 'tau_readout_ms',
              'input_scale', 'learning_rate', 'clip_norm')  # fmt: skip
  for name in positive:
    if not getattr(c, name) > 0:
      _bad(name, getattr(c, name), 'a number > 0')
  for name in ('recurrent_scale', 'readout_scale', 'rate_coefficient',
               'weight_decay'):  # fmt: skip
    if not getattr(c, name) >= 0:
      _bad(name, getattr(c, name), 'a number >= 0')
  if c.max_time is not None and not c.max_time > 0:
    _bad('max_time', c.max_time, 'a duration > 0 (seconds)')
  if c.target_rate_hz is not None and not 0 <= c.target_rate_hz * c.dt <= 1:
    _bad('target_rate_hz', c.target_rate_hz, 'a rate in [0, 1 / dt] Hz')
