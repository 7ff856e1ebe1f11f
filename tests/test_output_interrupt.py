"""Ctrl-C during the final HDF5 conversion: the conversion stops (never swallowed), no half file
takes the name, the staged rows stay, and a resumed run finishes the same output."""

from __future__ import annotations

import os
import signal

import h5py
import pytest
from test_writers import META, PATHS, batches, spec_for

from dinoreg.output import hdf5, store
from dinoreg.output.writer import Writer


def test_ctrl_c_in_the_conversion_stops_it_and_resume_finishes(tmp_path, monkeypatch):
    out = tmp_path / "out.h5"
    with Writer.open(spec_for(out, "h5"), META, "new") as w:
        for batch in batches(PATHS):
            w.write_batch(*batch)
        real = store.StagingStore.read
        calls = []

        def read_then_ctrl_c(self, name, start, stop):
            calls.append(name)
            if len(calls) == 1:  # inside the conversion, as a user would press it
                os.kill(os.getpid(), signal.SIGINT)
            return real(self, name, start, stop)

        monkeypatch.setattr(store.StagingStore, "read", read_then_ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            w.close(complete=True)
    monkeypatch.undo()
    assert len(calls) == 1  # stopped at the next block, not after the whole copy
    assert not out.exists() and not out.with_name("out.h5.tmp").exists()
    assert (tmp_path / "out.h5.partial").is_dir()  # the committed rows are still there
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler given back
    with Writer.open(spec_for(out, "h5"), META, "resume") as w:
        w.close(complete=True)
    with h5py.File(out) as f:
        assert len(f["paths"]) == len(PATHS) - sum(len(b[2]) for b in batches(PATHS))


def test_the_interrupt_check_is_a_no_op_off_the_main_thread():
    import threading

    done = []

    def run():
        with hdf5.interrupts_between_blocks() as check:
            check()
            done.append(True)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert done == [True]
