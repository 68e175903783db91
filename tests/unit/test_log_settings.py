"""Triton's log settings: what a service starts with, each refusal, which records are
written, and the settings applied to the process's logging (root logger, handlers, the
access log's sample)."""

import json
import logging

import pytest

from meshserve.common.errors import InvalidArgument
from meshserve.common.log_settings import (
    LevelFilter,
    LogControl,
    LogSettings,
    fill_log_settings,
    log_updates,
)
from meshserve.common.logs import JsonFormatter
from meshserve.protocol import grpc_service_pb2 as pb

START = {"log_file": "", "log_info": True, "log_warning": True, "log_error": True,
         "log_verbose_level": 0, "log_format": "json"}


@pytest.mark.parametrize(("level", "info", "warning", "error", "verbose"), [
    ("DEBUG", True, True, True, 1),
    ("info", True, True, True, 0),
    ("WARNING", False, True, True, 0),
    ("ERROR", False, False, True, 0),
])
def test_the_settings_a_service_starts_with_follow_its_log_level(level, info, warning, error,
                                                                 verbose):
    settings = LogSettings.at(level, "text")
    assert (settings.log_info, settings.log_warning, settings.log_error,
            settings.log_verbose_level, settings.log_format) == (info, warning, error,
                                                                 verbose, "text")


def test_the_settings_as_triton_names_them():
    assert LogSettings().as_dict() == START


@pytest.mark.parametrize(("updates", "message"), [
    ({"log_nope": True}, "unknown log setting 'log_nope' (settings: log_file, log_info, "
                         "log_warning, log_error, log_verbose_level, log_format)"),
    ({"log_info": 1}, "log setting 'log_info' takes true or false, not 1"),
    ({"log_verbose_level": True}, "log setting 'log_verbose_level' takes a whole number, "
                                  "not True"),
    ({"log_verbose_level": 1.5}, "log setting 'log_verbose_level' takes a whole number, "
                                 "not 1.5"),
    ({"log_verbose_level": -1}, "log setting 'log_verbose_level' must be from 0 to "
                                "4294967295, not -1"),
    ({"log_verbose_level": 2**32}, "log setting 'log_verbose_level' must be from 0 to "
                                   "4294967295, not 4294967296"),
    ({"log_format": "ISO8601"}, "log setting 'log_format' must be json or text, not "
                                "'ISO8601'"),
    ({"log_format": None}, "log setting 'log_format' takes a string, not None"),
    ({"log_file": "/etc/passwd"}, "log setting 'log_file' cannot be changed: the service "
                                  "logs to standard error, where the platform collects them"),
    ({"log_info": False, "log_error": "no"}, "log setting 'log_error' takes true or false, "
                                             "not 'no'"),
])
def test_a_refused_update_names_the_setting_and_changes_nothing(updates, message):
    settings = LogSettings()
    with pytest.raises(InvalidArgument) as refused:
        settings.changed(updates)
    assert refused.value.message == message
    assert settings.as_dict() == START


def test_an_update_changes_only_the_settings_it_names():
    changed = LogSettings().changed({"log_verbose_level": 2, "log_format": "text",
                                     "log_file": ""})
    assert changed.as_dict() == START | {"log_verbose_level": 2, "log_format": "text"}


def test_a_level_can_be_off_between_two_that_are_on():
    settings = LogSettings(log_info=True, log_warning=False, log_error=True)
    written = [settings.writes(level) for level in (logging.DEBUG, logging.INFO,
                                                    logging.WARNING, logging.ERROR,
                                                    logging.CRITICAL)]
    assert written == [False, True, False, True, True]
    assert settings.lowest_level() == logging.INFO
    assert LogSettings(log_info=False, log_warning=False, log_error=False).lowest_level() > \
        logging.CRITICAL


def test_grpc_settings_read_by_their_kind_and_answered_so():
    request = pb.LogSettingsRequest()
    request.settings["log_info"].bool_param = False
    request.settings["log_verbose_level"].uint32_param = 3
    request.settings["log_format"].string_param = "text"
    assert log_updates(request.settings) == {"log_info": False, "log_verbose_level": 3,
                                            "log_format": "text"}
    request.settings["log_error"]  # noqa: B018 — a setting sent without a value
    with pytest.raises(InvalidArgument, match="log setting 'log_error' is sent without a "
                                              "value"):
        log_updates(request.settings)
    answer = pb.LogSettingsResponse()
    fill_log_settings(answer.settings, LogSettings(log_verbose_level=3))
    assert {name: getattr(value, value.WhichOneof("parameter_choice"))
            for name, value in answer.settings.items()} == START | {"log_verbose_level": 3}
    assert answer.settings["log_info"].WhichOneof("parameter_choice") == "bool_param"
    assert answer.settings["log_verbose_level"].WhichOneof("parameter_choice") == \
        "uint32_param"


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def root():
    """A handler of the test's own on the root logger, as a service configures it (INFO,
    JSON lines); everything put back afterwards: the filters and formatters LogControl gave
    the handlers (pytest's among them) as they were."""
    logger = logging.getLogger()
    saved = (logger.level, logging.getLogger("meshserve").level)
    formatters = [(other, other.formatter) for other in logger.handlers]
    handler = Captured()
    handler.setFormatter(JsonFormatter("ingress"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    for other in logger.handlers:
        for added in [f for f in other.filters if isinstance(f, LevelFilter)]:
            other.removeFilter(added)
    for other, formatter in formatters:
        other.setFormatter(formatter)
    logger.setLevel(saved[0])
    logging.getLogger("meshserve").setLevel(saved[1])


def test_a_verbose_level_writes_meshserve_debug_records_and_samples_every_request(root):
    samples, audited = [], []
    control = LogControl("ingress", LogSettings(), 0.01, samples.append,
                         lambda by, changes: audited.append((by, changes)))
    logging.getLogger("meshserve.ingress.test").debug("before")
    assert control.update({"log_verbose_level": 1}, "client/ops").log_verbose_level == 1
    logging.getLogger("meshserve.ingress.test").debug("own")
    logging.getLogger("hpack.hpack").debug("a library's, with headers")
    control.update({"log_verbose_level": 0}, "client/ops")
    logging.getLogger("meshserve.ingress.test").debug("after")
    messages = [json.loads(line)["message"] for line in root.lines]
    assert messages == ["log settings changed by 'client/ops': log_verbose_level=1", "own",
                        "log settings changed by 'client/ops': log_verbose_level=0"]
    assert samples == [1.0, 0.01]
    assert audited == [("client/ops", "log_verbose_level=1"),
                       ("client/ops", "log_verbose_level=0")]


def test_levels_turned_off_are_not_written_and_the_format_changes_at_once(root):
    control = LogControl("ingress", LogSettings(), 0.01, lambda fraction: None)
    control.update({"log_warning": False, "log_format": "text"}, "client/ops")
    log = logging.getLogger("meshserve.ingress.test")
    log.info("info")
    log.warning("warning")
    log.error("error")
    assert [line.split(" ", 3)[-1] for line in root.lines[1:]] == [
        "INFO meshserve.ingress.test: info", "ERROR meshserve.ingress.test: error"]
    assert json.loads(root.lines[0])["level"] == "WARNING"  # the change, in the format before


def test_an_update_that_changes_nothing_is_not_logged_nor_audited(root):
    audited = []
    control = LogControl("ingress", LogSettings(), 0.01, lambda fraction: None,
                         lambda by, changes: audited.append(changes))
    control.update({"log_info": True, "log_format": "json"}, "client/ops")
    assert root.lines == [] and audited == []
    with pytest.raises(InvalidArgument):
        control.update({"log_info": True, "log_nope": 1}, "client/ops")
    assert control.settings == LogSettings()
