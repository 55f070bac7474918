"""flax_eprop: online e-prop for recurrent spiking networks written in Flax."""

__version__ = '0.1.0.dev0'
