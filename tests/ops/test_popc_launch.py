"""The popc kernel's launcher hands cuLaunchKernel one pointer per parameter, each pointing at that
parameter's value (pointers as given, Python ints as 32-bit ints). Checked on the CPU with a stand-in
for the driver that reads the values back through the pointers, as the driver does."""

import ctypes

from bitdelta.ops import cuda_popc


class RecordingDriver:
    """Stand-in for the CUDA driver library: cuLaunchKernel reads every parameter through its pointer."""

    def __init__(self, kinds):
        self.kinds, self.calls = kinds, []

    def cuLaunchKernel(self, fn, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        values = []
        for i, kind in enumerate(self.kinds):
            ptr = ctypes.cast(params[i], ctypes.POINTER(kind))
            values.append(ptr.contents.value)
        self.calls.append(((gx, gy, gz), (bx, by, bz), shared, stream.value, values, extra))
        return 0


def test_launch_passes_each_parameter_by_address(monkeypatch):
    args = [ctypes.c_void_p(0x7F0000001000), ctypes.c_void_p(0x7F0000002000), 7, -3, 2**31 - 1, 0]
    driver = RecordingDriver([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int])
    monkeypatch.setattr(cuda_popc, "_libs", lambda: (None, driver))
    cuda_popc._launch(ctypes.c_void_p(0x1234), (5, 2, 1), (128, 1, 1), args, 0xABC)
    (grid, block, shared, stream, values, extra), = driver.calls
    assert grid == (5, 2, 1) and block == (128, 1, 1) and shared == 0 and stream == 0xABC and extra is None
    assert values == [0x7F0000001000, 0x7F0000002000, 7, -3, 2**31 - 1, 0]
