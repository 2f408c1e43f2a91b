"""Layer saves on a worker thread while the next layer computes (resume.RunState's writes and commits)."""
from __future__ import annotations

import threading
from collections.abc import Callable


class BackgroundSaves:
    """Layer saves run one at a time on a worker thread while the next layer computes (on a GPU, writing and
    syncing a layer's activations is a large share of the layer's time). Saves keep their order:
    each waits for the one before. Disabled, `submit` saves at once (the CPU's way: a second copy of the
    activations would count against the run's memory), unless asked for `background` (the CPU's commits,
    RunState.write_layer: syncing files a layer already wrote, which needs no copy).
    The caller must not change the saved tensors in place until `wait` (see calibrate.memo.BlockMemo.fold_into)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, save: Callable[[], None], background: bool = False) -> None:
        self.wait()
        if not (self.enabled or background):
            save()
            return

        def run() -> None:
            try:
                save()
            except BaseException as e:  # raised in the caller's thread by the next wait
                self._error = e

        self._thread = threading.Thread(target=run, name="quantkit-save", daemon=True)
        self._thread.start()

    def wait(self, raise_error: bool = True) -> None:
        """Until the save in flight is on disk; re-raises its error unless raise_error is False (the caller is
        failing already and its own error matters more)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise error
