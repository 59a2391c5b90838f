"""A mix of apps and listeners with a ramp: warm up, ramp to the target, hold, cool down.

Stages are fractions of the run time and of the target user count
(``LOADTEST_RAMP_USERS``, ``LOADTEST_RAMP_SECONDS``); the mix keeps one listener per
``LOADTEST_RAMP_APP_SHARE`` of apps. Run with
``musicrl experiment locust --scenario mix`` (see docs/loadtests.md).
"""

from __future__ import annotations

from locust import LoadTestShape
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from loadtests.locustfile import AppUser, ListenerUser  # noqa: F401 - locust collects the users from here


class RampSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOADTEST_RAMP_", extra="ignore")

    users: int = Field(8, ge=1, description="Users at the plateau (apps + listeners).")
    seconds: float = Field(300.0, gt=0, description="Length of the whole run.")
    app_share: float = Field(0.5, ge=0, le=1, description="Share of the users that are apps.")


# (end of the stage as a fraction of the run, users as a fraction of the plateau)
STAGES = ((0.1, 0.25), (0.4, 1.0), (0.9, 1.0), (1.0, 0.25))


class RampShape(LoadTestShape):
    def __init__(self) -> None:
        super().__init__()
        self.ramp = RampSettings()
        # Locust splits the users between the classes in proportion to their weights.
        AppUser.weight = round(100 * self.ramp.app_share)
        ListenerUser.weight = 100 - AppUser.weight

    def tick(self):
        elapsed = self.get_run_time() / self.ramp.seconds
        for end, share in STAGES:
            if elapsed < end:
                users = max(1, round(self.ramp.users * share))
                return users, max(1.0, users / 10)
        return None
