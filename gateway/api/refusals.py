"""Refusals logged with a rate limit, so that a flood of bad requests cannot flood the log.

Refused tokens, foreign ``Host`` headers and timed-out connections are each worth a line for the operator, but an
attacker can cause thousands a second. A :class:`RefusalLog` logs the first ``limit`` of each window at WARNING and
counts the rest; the count is said in one line with the next refusal after the window.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class RefusalLog:
    """Log at most ``limit`` refusals per ``window_s`` seconds; count the others and say how many were left out.

    Parameters
    ----------
    logger
        Where the lines go (at WARNING).
    limit
        Refusals logged per window.
    window_s
        The window's length in seconds.
    clock
        Monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        limit: int = 10,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, not {window_s}")
        self.logger = logger
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._window_start = clock()
        self._logged = 0
        self._left_out = 0

    def refused(self, message: str, *args: object) -> None:
        """Log one refusal (``message % args``, never with a token or patient data) unless over the limit."""
        with self._lock:
            left_out = self._roll_window()
            log = self._logged < self.limit
            if log:
                self._logged += 1
            else:
                self._left_out += 1
        if left_out:
            self.logger.warning(
                "%d more refusal(s) in the last %.0f s were not logged (rate limit)", left_out, self.window_s
            )
        if log:
            self.logger.warning(message, *args)

    def _roll_window(self) -> int:
        """Start a new window if the current one is over; return how many refusals the old one left out."""
        now = self._clock()
        if now - self._window_start < self.window_s:
            return 0
        left_out, self._left_out, self._logged, self._window_start = self._left_out, 0, 0, now
        return left_out
