"""The simulated system: device speeds, transfer times, availability and dropouts (``[system]``)."""

from fedlt.system.devices import Devices, tail_shares
from fedlt.system.traces import read_availability_trace, read_speed_trace

__all__ = ["Devices", "read_availability_trace", "read_speed_trace", "tail_shares"]
