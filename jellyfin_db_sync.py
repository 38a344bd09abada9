"""jellyfin-db-sync: keep several Jellyfin servers in step for the same people.

Each Jellyfin server's Webhook plugin posts to ``/webhook/{server_name}``; every event is committed
to a SQLite queue before it is acknowledged, and worker threads write the resulting watch state
(played, resume position, favourite, like/dislike) and account changes to the other servers
through the Jellyfin REST API — only what differs, so our own echoes die out by themselves.

Run it with ``python -m jellyfin_db_sync --config config.yaml`` (or as a script, which keeps
~15 MB more: the README says why); the README explains set-up, the plugin configuration and
every config key (see also ``config.example.yaml``).

Sections, in the order data flows (search for "# ── Name" to jump to one):

  Constants and errors   limits, timings and the few errors we explain to people
  Config                 SETTINGS, the one table of settings; YAML file and JDS_* variables → Config
  Store                  the SQLite file: schema, migrations, every statement; returns dataclasses
  JellyfinClient         HTTP to one server; ServerVersion says what each version can do
  Library                item and user indexes, and matching an item across servers
  Fields                 REGISTRY: every synced field declared once (read, written, merged, said)
  Webhooks               a plugin body → checked values → which fields it truly reports
  Planner                the rules: echo, newest wins, coalescing, clock clamp, path policy
  Writers                a job → an Outcome: watch state, accounts; server health; counters
  Threads                SupervisedThread: restarted by the Service if one ever dies
  Syncer                 ingest → inbox → Planner → jobs → writers, and its threads
  Reconciler             full comparison passes (and playlists), through the same Planner
  Safety net             undo from the journal, the brake on mass removals, alerts, export/import
  Older program          what people switching from the older jellyfin-db-sync keep (all of 1.x)
  Web                    the Bottle app: routes, the Guard plugin, readiness, metrics
  main                   the command line, logging, the Service that owns every thread

The architecture is docs/design.md's (one process, one module, one SQLite file, data flowing one
way); where this file departs from it, the section says why.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import collections
import copy
import dataclasses
import difflib
import errno
import functools
import glob
import hashlib
import hmac
import http.client
import inspect
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import signal
import socket
import sqlite3
import sys
import tempfile
import threading
import time
import urllib.parse
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import bottle

__version__ = "1.0.0"

log = logging.getLogger("jellyfin_db_sync")

# ── Constants and errors ─────────────────────────────────────────────────────

DEFAULT_CONFIG_PATHS = ("/config/config.yaml", "./config.yaml")
STATIC_ROOT = Path(__file__).resolve().parent / "static"
MAX_BODY_BYTES = 1024 * 1024  # the plugin's largest bodies are a few KiB
# Open connections Waitress accepts at once (its default, 100, was easy to fill); fewer if the
# open-files limit is low (connection_limit). One client may hold at most half of them
# (PerAddressListener): more than any burst a Jellyfin server sends (the plugin opens a
# connection per concurrent event, and a connection refused is a webhook lost), and never all.
CONNECTION_LIMIT = 2048
CHANNEL_TIMEOUT = 30  # seconds a connection may stay idle (Waitress' default: 120)
WEBHOOK_THREADS = (
    8  # Waitress threads: webhooks answered at once, so at most this many rows per commit
)
INGEST_GATHER_ROWS = WEBHOOK_THREADS  # during a burst, a commit waits for this many rows…
INGEST_GATHER_SECONDS = 0.002  # …or this long, whichever comes first
# Intake first (Store.yield_to_intake): this many webhooks committed within this long (500/s),
# several at a time, make a burst, which lasts until such a stretch passes without one; during
# it the planner and the writers wait before each batch of theirs…
INTAKE_BURST_ROWS = 25
INTAKE_BURST_SECONDS = 0.05
# …for at most this long each time, so they never stop. A second, not less: at 0.2 s the planner
# still planned most of a 2,000-webhook burst while it arrived (a batch of 200 every 0.2 s), and
# 8 senders were answered at 1,224–1,764/s instead of 1,834–2,334/s; the changes were all
# written no later. The cost is a flood that never ends: 1,400/s, for 5 s or a minute, leaves
# 5–10 s of writes to a 50 ms-a-call server for after it (none at 0.2), answered no faster.
INTAKE_YIELD_SECONDS = 1.0
MIN_TOKEN_CHARS = 16  # webhook and API tokens: shorter ones can be guessed
SIGN_IN_FAILURES = 10  # failed dashboard sign-ins from one address within SIGN_IN_WINDOW…
SIGN_IN_WINDOW = 600.0  # …seconds, and that address gets 429 until the oldest is this old
HOUR, DAY = 3600, 86400  # seconds
SESSION_SECONDS = 30 * DAY  # a dashboard sign-in lasts 30 days
SIGN_IN_SLOWDOWN = 0.5  # seconds a failed sign-in is held (in one request thread at most)
ALERT_TEST_SECONDS = 10.0  # "Send test" on alerts: at most one this often
# /metrics: how long a change took to reach a target (upper bounds of the buckets, seconds).
DELAY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)
# A target's state read by a reconciliation pass is trusted for its writes for this long.
STATE_FRESH_SECONDS = 300.0
MAX_RETRY_DELAY = float(HOUR)  # a retry's pause doubles up to this
LIKE_RATING = 6.5  # Jellyfin: Likes is true for a Rating of at least this (docs/jellyfin.md §1)
PROVIDER_PREFIX = "Provider_"  # the plugin's keys for provider ids: Provider_imdb, Provider_tmdb, …
INDEX_OVERLAP_SECONDS = (
    300  # an incremental index refresh re-reads this much (the server's clock is not ours)
)
ECHO_EXPECTATION_SECONDS = HOUR  # an expected echo that never came is forgotten after this
PRUNE_EVERY_SECONDS = 600  # how often old history is pruned
HEALTH_CHECK_SECONDS = 30.0  # a reachable server is checked this often…
HEALTH_RECHECK_SECONDS = 10.0  # …an unreachable one at most this long apart
SERVER_CONFIRM_SECONDS = 2.0  # a failed write trusts a check this recent that found its server down
RESOLVE_BATCH = 100  # failed changes per server read again by each look (Syncer.resolve_failed)
PROBLEM_ROWS = 200  # jobs the dashboard's "Waiting and failed" groups, of each kind
RECONCILE_STARTUP_DELAY = 10.0  # seconds after start before reconcile.on_startup's pass
CLAIM_GROUPS = 8  # a writer claims up to this many items' jobs in one commit
CLAIM_ROWS_PER_GROUP = 4  # rows read per group claimed (an item has up to 4 fields due)
MAX_WRITE_CONNECTIONS = 8  # sync.write_connections: at most this many writes to one server at once
SUPERVISE_SECONDS = 0.5  # how often the Service looks for threads that died
STUCK_SECONDS = 60.0  # /readyz: an unplanned webhook older than this means the pipeline is stuck
READY_CACHE_SECONDS = 3.0  # /readyz answers from its last check for this long
REFUSED_LOG_SECONDS = 60.0  # a server's refused webhooks: one WARNING this often at most
HISTORY_CACHE_SECONDS = 30.0  # whole-table counts on the dashboard (history, index) are this fresh
# SQLite's page cache per connection (its default: 2,000 KiB): there is one connection per
# thread, a NAS has little RAM, and the operating system caches the file's pages anyway.
SQLITE_PAGE_CACHE_KIB = 128
# A page of ids as one parameter (a JSON array): one statement whatever the page's length. A "?"
# per id made another statement for every length, and the sqlite3 module keeps 128 prepared per
# connection: megabytes of them after a pass (issue 25).
IN_LIST = "(SELECT value FROM json_each(?))"
PLANNER_BURST_ROWS = 8  # a planner batch this big means webhooks are arriving in a burst
PLANNER_BURST_PAUSE = 0.02  # seconds the planner then waits, so its next batch is bigger
MAX_JSON_DEPTH = 8  # "Send All Properties" bodies are flat; nesting means garbage
MAX_STRING_CHARS = 32 * 1024
# A webhook dated later than this after we received it is taken as received (a clock ahead, or
# a forged date, must not make every later real change look older); said at most this often.
CLOCK_SKEW_ALLOWANCE = 120.0
RECENT_PAGE = 20  # the recent check reads this many played items (a page) and resume entries
RECENT_MAX_PAGES = 5  # …and further played pages only while they are all newer than its watermark
# A server's plugin is taken as silent when this many checks found changes no webhook brought…
SILENT_FINDS = 3
SILENT_WINDOW = 1800.0  # …within this many seconds, and no webhook came from it since the first
SILENT_WORDS = "the Webhook plugin on {server} is not posting to us"  # the card's and the alert's
CLOCK_WARNING_SECONDS = 600.0
TICKS_PER_SECOND = 10_000_000
INDEX_PAGE_SIZE = 500
# A person's list (played, favourites…) is read in pages this long: each page of a filtered
# /Items query costs the server a query of its own, and a pass reads every list (issue 25:
# 594 requests of 500 at 100,000 items). Without images or user data an entry is a few hundred
# bytes, so a page stays well under a megabyte.
LIST_PAGE_SIZE = 2000
IDS_PER_REQUEST = 100  # item ids in one ?ids= query (the URL stays well under 4 KiB)
# Item types we index: the leaf types played state lives on, plus the folders a person can heart
# or rate (issue 26) — shows (also to match episodes by their series' provider IDs,
# docs/jellyfin.md §2.5), seasons, albums, artists, collections and playlists.
LEAF_ITEM_TYPES = "Movie,Episode,Video,MusicVideo,Audio,AudioBook"
FOLDER_ITEM_TYPES = ("Series", "Season", "MusicAlbum", "MusicArtist", "BoxSet", "Playlist")
INDEX_ITEM_TYPES = ",".join((LEAF_ITEM_TYPES, *FOLDER_ITEM_TYPES))
# Kept in the server's own data folder under their name (metadata/artists/<name>,
# data/collections/<name> [boxset], data/playlists/<name>, a number added to a taken one): their
# path says no more than the name, and may be another person's playlist of that name elsewhere.
NAMED_ITEM_TYPES = ("MusicArtist", "BoxSet", "Playlist")
# A person's folders are listed by /Items, except artists: an artist is an item "by name" kept
# outside every library, and /Items with a userId looks only inside the person's libraries
# (LibraryManager.AddUserToQuery sets TopParentIds to their views); /Artists lists them
# (ArtistsController.GetArtists → LibraryManager.GetArtists, v10.11.8; the same on 10.8).
USER_FOLDER_TYPES = ",".join(t for t in FOLDER_ITEM_TYPES if t != "MusicArtist")
# What a person may heart or rate, artists aside: one /Items list for items and folders alike
# (IncludeItemTypes matches any of its types), so each such list costs one request, not two.
RATED_ITEM_TYPES = ",".join((LEAF_ITEM_TYPES, USER_FOLDER_TYPES))
# Sync log results that are a change — what the dashboard counts everywhere (Recent syncs,
# "changes in the last hour", the charts). "noop" (already so) and "stale" (older) changed nothing.
CHANGE_RESULTS = ("ok", "failed", "skipped", "absent", "dry_run")
JOURNAL_SCOPE_LIMIT = 100_000  # journal entries one undo may cover
UNDO_SAMPLE = 10  # lines of an undo preview shown per server
HELD_SAMPLE = 8  # held changes shown per group
ALERT_CHECK_SECONDS = 15.0  # how often the alert conditions are looked at
ALERT_TIMEOUT = 10.0  # seconds for one alert delivery
WEBHOOK_PLUGIN_ID = "71552a5a5c5c4350a2aeebe451a30173"  # the Webhook plugin (its WebhookPlugin.cs)
WEBHOOK_DESTINATION = "jellyfin-db-sync"  # the name of the plugin destination we set up and own
# What our destination sends: the events we act on, for the item types user data lives on.
WEBHOOK_NOTIFICATIONS = (
    "UserDataSaved",
    "PlaybackProgress",
    "PlaybackStop",
    "ItemAdded",
    "ItemDeleted",
    "UserCreated",
    "UserDeleted",
    "UserUpdated",
)
# Every NotificationType the Webhook plugin sends (its NotificationType.cs); others count as
# "other".
NOTIFICATION_TYPES = frozenset(
    """ItemAdded Generic PlaybackStart PlaybackProgress PlaybackStop SubtitleDownloadFailure
    AuthenticationFailure AuthenticationSuccess SessionStart PendingRestart TaskCompleted
    PluginInstallationCancelled PluginInstallationFailed PluginInstalled PluginInstalling
    PluginUninstalled PluginUpdated UserCreated UserDeleted UserLockedOut UserPasswordChanged
    UserUpdated UserDataSaved ItemDeleted""".split()
)
ITEM_EVENTS = ("UserDataSaved", "PlaybackStart", "PlaybackProgress", "PlaybackStop")
USER_EVENTS = ("UserCreated", "UserDeleted", "UserUpdated")
ACTED_ON = ITEM_EVENTS + USER_EVENTS + ("ItemAdded", "ItemDeleted")
ID_KEYS = ("ItemId", "UserId", "ServerId", "SeriesId", "SeasonId")
BOOL_KEYS = ("Played", "Favorite", "Likes", "IsPaused", "IsAutomated", "PlayedToCompletion")
# Whole numbers: ticks, counts, season, episode and year are never negative.
INT_KEYS = (
    "PlaybackPositionTicks",
    "RunTimeTicks",
    "PlayCount",
    "SeasonNumber",
    "EpisodeNumber",
    "Year",
)
DATE_KEYS = ("UtcTimestamp", "LastPlayedDate", "LastLoginDate")
INT64_MAX = 2**63 - 1  # SQLite's INTEGER, and .NET's long
INT32_MAX = 2**31 - 1  # .NET's int: the server's PlayCount, season, episode and year
INT32_KEYS = frozenset(("PlayCount", "SeasonNumber", "EpisodeNumber", "Year"))
NO_DATE = "0001-01-01"  # DateTime.MinValue: the plugin's "no date" (docs/jellyfin.md §1, dates)
LAST_DATE = 253402300800.0  # 10000-01-01T00:00:00Z
# Kept keys checked by kind in parse_webhook; every other kept key must be text.
TYPED_KEYS = frozenset((*ID_KEYS, *BOOL_KEYS, *INT_KEYS, *DATE_KEYS, "Rating"))
HEX32 = re.compile(r"^[0-9a-f]{32}$")
KEEP_KEYS = frozenset(
    (
        "NotificationType",
        "ServerId",
        "ServerName",
        "ServerVersion",
        "UtcTimestamp",
        "Name",
        "ItemId",
        "ItemType",
        "RunTimeTicks",
        "Year",
        "SeriesName",
        "SeriesId",
        "SeasonId",
        "SeasonNumber",
        "EpisodeNumber",
        "UserId",
        "NotificationUsername",
        "PlaybackPositionTicks",
        "IsPaused",
        "IsAutomated",
        "PlayedToCompletion",
        "Played",
        "Favorite",
        "Likes",
        "Rating",
        "PlayCount",
        "LastPlayedDate",
        "SaveReason",
        "DeviceName",
        "ClientName",
        "LastLoginDate",
    )
)


class SyncError(Exception):
    """Base of the errors this program explains to its user."""


class StoreError(SyncError):
    """The SQLite file cannot be used as it is; the message says what to do."""


class StoreBusy(StoreError):
    """The file cannot be written now (locked by another writer, disk full, read-only): a later
    try may succeed, so what was being done is not the data's fault."""


class ConfigError(SyncError):
    """The configuration is wrong; the message names the file and key."""


class JellyfinError(SyncError):
    """A Jellyfin request failed. ``retryable`` is true for network errors and 5xx."""

    def __init__(self, message: str, status: int = 0, retryable: bool = True):
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class WebhookError(SyncError):
    """A webhook body is not something we accept; ``status`` is the HTTP code to answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# One encoder for the inbox rows: json.dumps builds a new one per call when given separators.
_compact_json = json.JSONEncoder(separators=(",", ":")).encode


def utcnow() -> float:
    return time.time()


_ISO = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2}):(\d{2})(\.\d+)?(Z|[+-]\d{2}:?\d{2})?$"
)


def parse_time(value: Any) -> float | None:
    """Parse Jellyfin's ISO dates (7 fractional digits, ``Z`` or an offset) to epoch seconds.

    The pattern decides what is accepted; datetime's C parser (a sixth of the cost of doing it
    by hand, and the planner does it for every event) reads it, to the microsecond.
    """
    if not isinstance(value, str) or not _ISO.match(value):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:  # 30 February and the like
        return None
    epoch = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    # Before 1970 is no date we can use (the server's "no date" is 0001-01-01, with any offset);
    # past the year 9999 in UTC, no date can be written back (format_time).
    return epoch if 0 <= epoch < LAST_DATE else None


def folder_problem(db_path: str) -> str | None:
    """Why the database cannot be created or written where it is configured, naming the user
    this program runs as and the command that fixes it; None if it can. (Docker creates a
    missing host folder as root, and SQLite needs the folder writable for its WAL files.)"""
    if db_path == ":memory:":
        return None
    target = Path(db_path).absolute()
    if target.exists() and not os.access(target, os.R_OK | os.W_OK):
        where = target
    else:
        where = target.parent
        while not where.exists() and where != where.parent:
            where = where.parent  # the folders to create: the first that exists must be writable
        if os.access(where, os.W_OK | os.X_OK):
            return None
    uid, gid = (os.getuid(), os.getgid()) if hasattr(os, "getuid") else (0, 0)
    return (
        f"{where} cannot be written by the user this program runs as (uid {uid}, gid {gid}). "
        f"Fix it with: sudo chown -R {uid}:{gid} {where}  (in Docker: or set PUID/PGID to its "
        "owner)"
    )


def format_time(epoch: float) -> str:
    """UTC ISO with ``Z``, as Jellyfin expects (docs/jellyfin.md §2)."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f0Z")


def timeline_start(minutes: int, bucket: int, now: float) -> float:
    """Where a chart of the last ``minutes`` in ``bucket``-second bars begins: at a whole bucket,
    the current one being the last bar, so whatever is counted has a bar to be drawn in."""
    bars = max(1, round(minutes * 60 / bucket))
    return float((int(now // bucket) - bars + 1) * bucket)


class Throttle:
    """Says "now" at most once per ``seconds`` for each key: for log lines that a flood would
    repeat (a server's clock, its refused webhooks, one host's refused connections)."""

    def __init__(self) -> None:
        self._said: dict[str, float] = {}  # key → monotonic time it was last said
        self._lock = threading.Lock()  # guards _said (callers run in several threads)

    def due(self, key: str, seconds: float) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._said.get(key)
            if last is not None and now - last < seconds:
                return False
            self._said[key] = now
            return True


def normalise_id(value: Any) -> str:
    """Templates render GUIDs with dashes; "Send All Properties" without (docs/jellyfin.md §1)."""
    return str(value).replace("-", "").replace("{", "").replace("}", "").lower()


def name_key(name: str) -> str:
    """Jellyfin user names are case-insensitive on every version (docs/jellyfin.md §2.6)."""
    return name.strip().casefold()


# ── Config ───────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Setting:
    """One setting of the config file, said once: this table drives parsing, the environment
    variables, --help and --check-config, and a test holds config.example.yaml and the README's
    table of variables to it. (Servers, users.map and path_sync_policy are lists of mappings,
    parsed by their own functions below.)"""

    key: str  # its path in the file: "sync.max_retries"
    kind: str  # bool, int, float, str, choice, token, password, url, cpu, list, names
    default: Any
    help: str
    env: str = ""  # the JDS_* variable that overrides it
    attr: str = ""  # its Config attribute, for settings outside sync/users/reconcile
    choices: tuple[str, ...] = ()
    low: float | None = None  # numbers: the smallest and largest allowed
    high: float | None = None


SETTINGS: tuple[Setting, ...] = (
    Setting("server.host", "str", "0.0.0.0", "address to listen on", "JDS_HOST", "host"),
    Setting("server.port", "int", 8080, "port to listen on", "JDS_PORT", "port", low=1, high=65535),
    Setting(
        "server.webhook_token",
        "token",
        "",
        "token the plugin must send",
        "JDS_WEBHOOK_TOKEN",
        "webhook_token",
    ),
    Setting(
        "server.api_token", "token", "", "token for scripts (Bearer)", "JDS_API_TOKEN", "api_token"
    ),
    Setting(
        "server.auth.username",
        "str",
        "",
        "dashboard sign-in: user name",
        "JDS_AUTH_USERNAME",
        "auth_username",
    ),
    Setting(
        "server.auth.password",
        "password",
        "",
        "dashboard sign-in: password",
        "JDS_AUTH_PASSWORD",
        "auth_password",
    ),
    Setting("server.cpu", "cpu", "any", "any, auto or a CPU number", "JDS_CPU", "cpu"),
    Setting(
        "server.public_url",
        "url",
        "",
        "address browsers use (reverse proxy)",
        "JDS_PUBLIC_URL",
        "public_url",
    ),
    Setting(
        "server.allowed_hosts",
        "list",
        (),
        "more Host names to answer",
        "JDS_ALLOWED_HOSTS",
        "allowed_hosts",
    ),
    Setting(
        "database.path",
        "str",
        "/data/jellyfin-db-sync.db",
        "SQLite file",
        "JDS_DATABASE_PATH",
        "database_path",
    ),
    Setting(
        "database.journal_mode",
        "choice",
        "WAL",
        "WAL, or DELETE/TRUNCATE on a network share",
        attr="journal_mode",
        choices=("WAL", "DELETE", "TRUNCATE"),
    ),
    Setting(
        "database.retention_days",
        "float",
        30.0,
        "days history is kept",
        "JDS_RETENTION_DAYS",
        "retention_days",
    ),
    Setting(
        "logging.level",
        "choice",
        "INFO",
        "DEBUG, INFO, WARNING, ERROR or CRITICAL",
        "JDS_LOG_LEVEL",
        "log_level",
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
    ),
    Setting("sync.playback_progress", "bool", True, "sync resume positions"),
    Setting("sync.watched_status", "bool", True, "sync played / unplayed"),
    Setting("sync.favorites", "bool", True, "sync favourites"),
    Setting("sync.ratings", "bool", True, "sync likes and dislikes"),
    Setting("sync.likes", "bool", True, "same as ratings (older program's name)"),  # Older program
    Setting("sync.playlists", "bool", True, "mirror playlists"),
    Setting("sync.play_count", "bool", True, "carry play counts when marking played"),
    Setting("sync.last_played_date", "bool", True, "carry last-played dates"),
    Setting("sync.preferences", "bool", True, "a person's language and playback preferences"),
    # Older program: accepted for its configs; off by default: no version lets an API key write
    # them (ServerVersion.writes_stream_choices), and switched on they only bring a warning.
    Setting("sync.audio_stream", "bool", False, "accepted for compatibility; cannot be synced"),
    Setting("sync.subtitle_stream", "bool", False, "accepted for compatibility; cannot be synced"),
    Setting(
        "sync.progress_debounce_seconds",
        "float",
        10.0,
        "longest wait before a position is written",
        "JDS_PROGRESS_DEBOUNCE_SECONDS",
    ),
    Setting("sync.worker_interval_seconds", "float", 5.0, "longest sleep between checks"),
    Setting(
        "sync.max_retries", "int", 5, "retries before a change fails", "JDS_MAX_RETRIES", low=0
    ),
    Setting("sync.retry_base_seconds", "float", 5.0, "first retry delay (then doubled)"),
    Setting("sync.index_refresh_seconds", "float", 60.0, "item index refreshed at most this often"),
    Setting(
        "sync.write_connections",
        "int",
        2,
        "writes to one server at once",
        low=1,
        high=MAX_WRITE_CONNECTIONS,
    ),
    Setting("sync.dry_run", "bool", False, "decide and log, write nothing", "JDS_DRY_RUN"),
    Setting("users.create", "bool", True, "create accounts on the others"),
    Setting("users.delete", "bool", True, "delete accounts on the others", "JDS_DELETE_USERS"),
    Setting("users.rename", "bool", True, "rename accounts on the others"),
    Setting(
        "users.new_user_password",
        "choice",
        "random",
        "random or disabled",
        "JDS_NEW_USER_PASSWORD",
        choices=("random", "disabled"),
    ),
    Setting("users.include", "names", (), "only these people (empty: everyone)"),
    Setting("users.exclude", "names", (), "never these people"),
    Setting("reconcile.on_startup", "bool", True, "a pass shortly after start"),
    Setting(
        "reconcile.interval_minutes", "float", 360.0, "then every N minutes (0: on demand only)"
    ),
    Setting(
        "reconcile.recent_check_seconds",
        "float",
        60.0,
        "look for recent plays no webhook brought this often (0: off)",
        low=0,
    ),
    Setting(
        "safety.brake_items",
        "int",
        100,
        "hold removals from one server past this many items per person (0: off)",
        "JDS_BRAKE_ITEMS",
        low=0,
    ),
    Setting(
        "safety.brake_minutes", "float", 10.0, "… within this many minutes", "JDS_BRAKE_MINUTES"
    ),
    Setting(
        "safety.removal_delay_seconds",
        "float",
        20.0,
        "removals wait this long before they go, so the brake judges a burst first",
        "JDS_REMOVAL_DELAY_SECONDS",
        low=0,
    ),
    Setting(
        "alerts.urls",
        "urls",
        (),
        "alert URLs: JSON, ntfy, Gotify, Discord, Slack (Apprise if installed)",
        "JDS_ALERT_URLS",
    ),
    Setting(
        "alerts.healthchecks_url",
        "secret_url",
        "",
        "pinged at each pass's start, success or failure",
        "JDS_HEALTHCHECKS_URL",
    ),
    Setting(
        "alerts.unreachable_minutes", "float", 10.0, "alert when a server is unreachable this long"
    ),
)
SETTING = {s.key: s for s in SETTINGS}
# Older program: other names it accepted for a choice: Python's level names, and journal
# modes SQLite has but a durable queue must not use (MEMORY, OFF: WAL is kept, with a warning).
CHOICE_ALIASES = {
    "WARN": "WARNING",
    "FATAL": "CRITICAL",
    "NOTSET": "DEBUG",
    "MEMORY": "WAL",
    "OFF": "WAL",
}
SECTIONS = (
    "servers",
    "sync",
    "users",
    "reconcile",
    "path_sync_policy",
    "database",
    "server",
    "logging",
    "safety",
    "alerts",
)
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0", "")


def _default(key: str) -> Any:
    return SETTING[key].default


@dataclass(frozen=True)
class ServerConfig:
    name: str
    url: str
    api_key: str
    passwordless: bool = False
    path_map: tuple[tuple[str, str], ...] = ()  # (server prefix, shared prefix)
    webhook_token: str = ""  # this server's own; when set, server.webhook_token is not accepted

    def __repr__(self) -> str:  # never print the key or the token, even in a traceback
        return f"ServerConfig(name={self.name!r}, url={self.url!r}, api_key='***')"


@dataclass(frozen=True)
class SyncConfig:
    playback_progress: bool = _default("sync.playback_progress")
    watched_status: bool = _default("sync.watched_status")
    favorites: bool = _default("sync.favorites")
    ratings: bool = _default("sync.ratings")
    likes: bool = _default("sync.likes")  # Older program
    playlists: bool = _default("sync.playlists")
    play_count: bool = _default("sync.play_count")
    last_played_date: bool = _default("sync.last_played_date")
    preferences: bool = _default("sync.preferences")
    audio_stream: bool = _default("sync.audio_stream")  # Older program
    subtitle_stream: bool = _default("sync.subtitle_stream")  # Older program
    progress_debounce_seconds: float = _default("sync.progress_debounce_seconds")
    worker_interval_seconds: float = _default("sync.worker_interval_seconds")
    max_retries: int = _default("sync.max_retries")
    retry_base_seconds: float = _default("sync.retry_base_seconds")
    index_refresh_seconds: float = _default("sync.index_refresh_seconds")
    write_connections: int = _default(
        "sync.write_connections"
    )  # fast, never a stampede on a small NAS
    dry_run: bool = _default("sync.dry_run")


@dataclass(frozen=True)
class PathPolicy:
    prefix: str
    absent_retry_count: int = 0
    retry_delay_seconds: float = 300.0


@dataclass(frozen=True)
class UsersConfig:
    create: bool = _default("users.create")  # UserCreated on one server → created on the others
    delete: bool = _default("users.delete")  # UserDeleted → deleted on the others (never an admin)
    rename: bool = _default("users.rename")  # UserUpdated (a rename) → renamed on the others
    # "random": a strong generated password, shown once to the operator (default: the account
    # works at once and nobody else knows the password). "disabled": no password, and the
    # account is disabled until an administrator sets one (nobody can log in meanwhile).
    new_user_password: str = _default("users.new_user_password")
    include: tuple[str, ...] = _default("users.include")  # case-folded names; empty = everyone
    exclude: tuple[str, ...] = _default("users.exclude")
    # Each entry is one person: {server name: their user name there}.
    map: tuple[tuple[tuple[str, str], ...], ...] = ()


@dataclass(frozen=True)
class ReconcileConfig:
    on_startup: bool = _default("reconcile.on_startup")  # catches what happened while we were down
    interval_minutes: float = _default("reconcile.interval_minutes")
    recent_check_seconds: float = _default("reconcile.recent_check_seconds")  # RecentCheck; 0 = off


@dataclass(frozen=True)
class SafetyConfig:
    brake_items: int = _default("safety.brake_items")  # removals per person and source; 0 = off
    brake_minutes: float = _default("safety.brake_minutes")
    # A removal's settling time: a burst that the brake will hold is held before any of it goes.
    removal_delay_seconds: float = _default("safety.removal_delay_seconds")


@dataclass(frozen=True)
class AlertsConfig:
    urls: tuple[str, ...] = dataclasses.field(
        default=_default("alerts.urls"), repr=False
    )  # they hold tokens
    healthchecks_url: str = dataclasses.field(
        default=_default("alerts.healthchecks_url"), repr=False
    )
    unreachable_minutes: float = _default("alerts.unreachable_minutes")


@dataclass(frozen=True)
class Config:
    servers: tuple[ServerConfig, ...]
    sync: SyncConfig = SyncConfig()
    users: UsersConfig = UsersConfig()
    reconcile: ReconcileConfig = ReconcileConfig()
    safety: SafetyConfig = SafetyConfig()
    alerts: AlertsConfig = AlertsConfig()
    path_sync_policy: tuple[PathPolicy, ...] = ()
    database_path: str = _default("database.path")
    journal_mode: str = _default("database.journal_mode")
    host: str = _default("server.host")
    port: int = _default("server.port")
    webhook_token: str = _default("server.webhook_token")
    api_token: str = _default("server.api_token")
    auth_username: str = _default("server.auth.username")  # the dashboard's and JSON API's sign-in
    auth_password: str = _default("server.auth.password")
    cpu: str = _default("server.cpu")  # see keep_to_one_cpu
    public_url: str = _default("server.public_url")  # this service's address as browsers see it
    allowed_hosts: tuple[str, ...] = _default("server.allowed_hosts")  # see host_allowed
    retention_days: float = _default("database.retention_days")
    log_level: str = _default("logging.level")
    source: str = "<defaults>"
    warnings: tuple[str, ...] = ()  # what was accepted but should be mended (unknown keys, …)

    def syncs(self, name: str) -> bool:
        """Is this synced field switched on (its entry in REGISTRY names its switches)?"""
        return synced(name).enabled(self)

    def person(self, server: str, username: str) -> str:
        """The key of the person behind ``username`` on ``server``: the case-folded name, or for
        someone in ``users.map``, the case-folded name of their first mapped account."""
        key = name_key(username)
        for group in self.users.map:
            if any(srv == server and name_key(name) == key for srv, name in group):
                return name_key(group[0][1])
        return key

    def _mapping(self, person: str) -> dict[str, str]:
        """{server: user name} of ``person``'s entry in ``users.map`` (empty if none)."""
        for group in self.users.map:
            if name_key(group[0][1]) == person:
                return dict(group)
        return {}

    def mapped_name(self, person: str, server: str) -> str | None:
        """The user name (as written in users.map) ``person`` has on ``server``, if mapped."""
        return self._mapping(person).get(server)

    def name_on(self, person: str, server: str) -> str:
        """The case-folded user name ``person`` has on ``server``."""
        mapped = self.mapped_name(person, server)
        return name_key(mapped) if mapped else person

    def user_synced(self, person: str) -> bool:
        """users.include / users.exclude, matched against every name the person has."""
        names = {person} | {name_key(n) for n in self._mapping(person).values()}
        if self.users.include and not names & set(self.users.include):
            return False
        return not names & set(self.users.exclude)

    def server(self, name: str) -> ServerConfig | None:
        for s in self.servers:
            if s.name == name:
                return s
        return None

    def webhook_token_for(self, name: str) -> str:
        """The token /webhook/<name> requires ("" = none): the server's own, else the shared one."""
        srv = self.server(name)
        return (srv.webhook_token if srv else "") or self.webhook_token

    def open_webhooks(self) -> list[str]:
        """Servers whose webhook URL takes posts from anyone (no token at all)."""
        return [s.name for s in self.servers if not self.webhook_token_for(s.name)]

    def policy_for(self, path: str) -> PathPolicy:
        """The longest matching ``path_sync_policy`` prefix; default: no retry."""
        best = None
        for p in self.path_sync_policy:
            if path.startswith(p.prefix) and (best is None or len(p.prefix) > len(best.prefix)):
                best = p
        return best or DEFAULT_POLICY


DEFAULT_POLICY = PathPolicy(prefix="", absent_retry_count=0)

_SERVER_KEYS = {"name", "url", "api_key", "passwordless", "path_map", "webhook_token"}
_POLICY_KEYS = {"prefix", "absent_retry_count", "retry_delay_seconds"}
_SERVER_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


# Environment variables for template users (unRAID, TrueNAS, docker run -e): each setting's
# ``env`` in SETTINGS, and JDS_SERVER_<N>_<field> for each server field below. Each also reads
# VAR_FILE (a Docker secret).
ENV_SETTINGS = {s.env: s for s in SETTINGS if s.env}
EXAMPLE_API_KEYS = ("paste-an-api-key-here", "your-api-key-here")
SERVER_ENV_FIELDS = {
    "NAME": ("name", "str"),
    "URL": ("url", "str"),
    "API_KEY": ("api_key", "key"),
    "PASSWORDLESS": ("passwordless", "bool"),
    "WEBHOOK_TOKEN": ("webhook_token", "token"),
}
_SERVER_ENV = re.compile(rf"^JDS_SERVER_(\d{{1,2}})_({'|'.join(SERVER_ENV_FIELDS)})(_FILE)?$")


def _servers_in_env(env: Any) -> bool:
    """JDS_SERVER_* variables are set (not empty): they may stand in for a config file."""
    return any(k.startswith("JDS_SERVER_") and str(v).strip() for k, v in env.items())


def _env_value(name: str, raw: str, setting: Setting, file: bool) -> Any:
    where = f"environment {name}"
    if file:
        try:
            raw = Path(raw).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError(f"{where}: cannot read {raw} ({e.strerror})") from None
    value = _coerce(setting, raw, where)
    return list(value) if isinstance(value, tuple) else value


def _put(data: dict, key: str, value: Any, var: str) -> None:
    """Set ``key`` ("server.auth.username") in the file's data, making mappings on the way."""
    *outer, last = key.split(".")
    node = data
    for part in outer:
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ConfigError(f"environment {var}: the config's {part}: is not a mapping")
        node = node[part]
    node[last] = value


def apply_env(data: dict, env: dict[str, str], warnings: list[str] | None = None) -> bool:
    """Merge JDS_* variables over the file's settings. Returns True if any was set.

    An empty variable means "not set" (templates ship them empty: it must not erase what the
    file says), and a JDS_* name we do not know is a warning naming the closest one we do.
    """
    used = False
    for var, value in sorted(env.items()):
        if not var.startswith("JDS_") or not value.strip():
            continue
        base, file = (var[:-5], True) if var.endswith("_FILE") else (var, False)
        if base not in ENV_SETTINGS and not _SERVER_ENV.match(var) and warnings is not None:
            known = [*ENV_SETTINGS, *(f"JDS_SERVER_1_{f}" for f in SERVER_ENV_FIELDS)]
            close = difflib.get_close_matches(base, known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else "see --help for the variables"
            warnings.append(f"environment {var}: unknown variable, ignored — {hint}")
            continue
        if base in ENV_SETTINGS:
            setting = ENV_SETTINGS[base]
            _put(data, setting.key, _env_value(var, value, setting, file), var)
            used = True
            continue
        m = _SERVER_ENV.match(var)
        if m:
            index = int(m.group(1)) - 1
            if index < 0:
                raise ConfigError(f"environment {var}: servers are numbered from 1")
            servers = data.setdefault("servers", [])
            if not isinstance(servers, list):
                raise ConfigError(f"environment {var}: the config's servers: is not a list")
            while len(servers) <= index:
                servers.append({})
            key, kind = SERVER_ENV_FIELDS[m.group(2)]
            servers[index][key] = _env_value(
                var, value, Setting(key, kind, None, ""), bool(m.group(3))
            )
            used = True
    if "servers" in data and isinstance(data["servers"], list):
        data["servers"] = [s for s in data["servers"] if s != {}]
    return used


def load_config(path: str | os.PathLike, env: dict[str, str] | None = None) -> Config:
    """Read and validate a YAML config file, with JDS_* environment variables merged over it.
    Every error names the file (or variable) and the key."""
    import yaml  # imported here so --help works before requirements are installed

    env = dict(os.environ) if env is None else env
    src = str(path)
    data: Any = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        if not _servers_in_env(env):
            raise ConfigError(f"{src}: file not found") from None
        text, src = "", "environment"
    except OSError as e:
        raise ConfigError(f"{src}: cannot read ({e.strerror})") from None
    try:
        data = yaml.safe_load(text) if text else {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{src}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    data = data or {}
    env_warnings: list[str] = []
    if isinstance(data, dict) and apply_env(data, env, env_warnings) and src != "environment":
        src = f"{src} + environment"
    config = parse_config(data, src)
    return (
        dataclasses.replace(config, warnings=(*env_warnings, *config.warnings))
        if env_warnings
        else config
    )


def _mask(secret: str) -> str:
    return "" if not secret else "***" + (secret[-2:] if len(secret) >= 12 else "")


def masked(config: Config) -> dict:
    """The effective configuration with every secret replaced, for --check-config."""
    out = dataclasses.asdict(config)
    for srv in out["servers"]:
        srv["api_key"] = _mask(srv["api_key"])
        srv["webhook_token"] = _mask(srv["webhook_token"])
    for setting in SETTINGS:
        if setting.kind in ("token", "password"):
            out[setting.attr] = _mask(out[setting.attr])
    out["alerts"]["urls"] = [url_shown(u) for u in config.alerts.urls]
    out["alerts"]["healthchecks_url"] = url_shown(config.alerts.healthchecks_url)
    return out


def url_shown(url: str) -> str:
    """An alert URL as logs and pages may show it: its scheme and host; the rest (tokens,
    webhook secrets, topics) is never shown."""
    if not url:
        return ""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.rpartition("+")[2] not in ("http", "https"):
        # Apprise URLs carry tokens where a host would be (tgram://<token>/…)
        return f"{parts.scheme}://…"
    return f"{parts.scheme}://{parts.hostname or ''}/…"


def _coerce(setting: Setting, value: Any, where: str) -> Any:
    """A value from the file or the environment, as the setting's kind wants it. Quoted
    numbers and booleans ("8080", "true") are taken as such, as Helm-rendered YAML has them."""
    kind = setting.kind
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower() if isinstance(value, str | int) else None
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if kind in ("int", "float"):
        return _number(setting, value, where)
    if kind == "urls":
        if isinstance(value, str):  # an environment variable: separated by spaces or commas
            value = value.replace(",", " ").split()
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, str) and "://" in v for v in value
        ):
            raise ConfigError(
                f"{where}: expected a list of URLs (https://…, or an Apprise URL like tgram://…)"
            )
        urls = tuple(v.strip() for v in value)
        for n, url in enumerate(urls):
            _check_secret_url(f"{where}[{n}]", url)
        return urls
    if kind == "secret_url":
        url = str(value or "").strip()
        if url and urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ConfigError(
                f"{where}: an http:// or https:// URL, like https://hc-ping.com/<uuid>"
            )
        _check_secret_url(where, url)
        return url
    if kind in ("list", "names"):
        if isinstance(value, str):  # an environment variable: comma-separated
            value = [part.strip() for part in value.split(",") if part.strip()]
        if value is None:
            value = []
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise ConfigError(f"{where}: expected a list of names")
        if kind == "names":
            return tuple(name_key(v) for v in value)
        return tuple(v.strip().lower().rstrip(".") for v in value)
    if value is None:
        value = ""
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise ConfigError(f"{where}: expected text, got {value!r}")
    text = str(value)
    if kind == "choice":
        wanted = CHOICE_ALIASES.get(text.strip().upper(), text.strip())
        for choice in setting.choices:
            if wanted.lower() == choice.lower():
                return choice
        raise ConfigError(f"{where}: one of {', '.join(setting.choices)}")
    if kind == "cpu":
        cpu = text.strip().lower()
        if cpu not in ("auto", "any") and not (cpu.isdigit() and int(cpu) < 4096):
            raise ConfigError(
                f"{where}: any (default: let the threads move), auto (the last CPU), or a CPU "
                "number"
            )
        return cpu
    if kind == "url":
        url = text.strip().rstrip("/")
        parts = urllib.parse.urlsplit(url)
        if url and (parts.scheme not in ("http", "https") or not parts.hostname):
            raise ConfigError(
                f"{where}: {url!r}: the address browsers and Jellyfin use, like "
                "https://sync.example.com"
            )
        return url
    if kind in ("token", "key"):
        # Docker and Kubernetes secret files end in a newline: whitespace around a key or token
        # is never part of it. What is left must fit in an HTTP header (the key goes to Jellyfin
        # in one, tokens come in one); the error names the key, never the value.
        text = text.strip()
        if not _HEADER_SAFE.fullmatch(text):
            raise ConfigError(
                f"{where}: contains a line break or another character an HTTP header cannot carry "
                "(the value is not shown): copy it again"
            )
    if kind == "token" and text and len(text) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"{where}: use at least {MIN_TOKEN_CHARS} characters (a short token can be guessed)"
        )
    if kind == "password" and text and len(text) < 8:
        raise ConfigError(f"{where}: use at least 8 characters")
    return text


def _check_secret_url(where: str, url: str) -> None:
    """A URL that carries a secret cannot hold a space or a control character: the request
    would fail with an error quoting the URL, token and all. Said without the URL's secrets."""
    if re.search(r"[\s\x00-\x1f\x7f]", url):
        raise ConfigError(
            f"{where}: {url_shown(url)} holds a space or a control character; write a space as %20 "
            "(the rest of the URL is not shown here: it may hold a token)"
        )


def without_url(text: str, url: str) -> str:
    """An error message about a request to ``url`` with every part of that URL that could be a
    secret (path, query, user and password, an Apprise URL's host) replaced by "…"."""
    parts = urllib.parse.urlsplit(url)
    pieces = {url, parts.netloc, parts.path, parts.query, f"{parts.path}?{parts.query}"}
    pieces |= {v for _, v in urllib.parse.parse_qsl(parts.query)} | set(parts.path.split("/"))
    for piece in sorted((p for p in pieces if len(p) > 3), key=len, reverse=True):
        text = text.replace(piece, "…")
    return text


_HEADER_SAFE = re.compile(r"[\x21-\x7e]*(?:[ \t]+[\x21-\x7e]+)*")  # printable ASCII, no line breaks


def _number(setting: Setting, value: Any, where: str) -> int | float:
    whole = setting.kind == "int"
    if isinstance(value, str):
        try:
            value = int(value.strip()) if whole else float(value.strip())
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if isinstance(value, float) and whole and value.is_integer():
        value = int(value)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (whole and not isinstance(value, int))
    ):
        raise ConfigError(
            f"{where}: expected a {'whole number' if whole else 'number'}, got {value!r}"
        )
    low = setting.low if setting.low is not None else (None if whole else 0.0)
    if (low is not None and value < low) or (setting.high is not None and value > setting.high):
        if setting.high is not None:
            raise ConfigError(f"{where}: must be {setting.low:g}–{setting.high:g}")
        raise ConfigError(f"{where}: must be ≥ {low:g}")
    return value if whole else float(value)


def _settings_in(data: dict, src: str, warnings: list[str]) -> dict[str, Any]:
    """{setting key: raw value} of every table setting the file's sections hold; an unknown key
    is ignored with a warning naming it (the older program ignored them silently; --check-config
    calls them errors, so a typo is still caught where people look)."""
    found: dict[str, Any] = {}
    for section in (
        "sync",
        "users",
        "reconcile",
        "database",
        "server",
        "logging",
        "safety",
        "alerts",
    ):
        raw = data.get(section) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{src}: {section}: expected a mapping")
        for key, value in raw.items():
            path = f"{section}.{key}"
            if path == "users.map":
                continue  # a list of mappings: _parse_map
            if path == "server.auth":
                found.update(_auth_values(value, src))
                continue
            if path not in SETTING:
                warnings.append(
                    _unknown_key(
                        src, path, [s.key for s in SETTINGS if s.key.startswith(section + ".")]
                    )
                )
                continue
            found[path] = value
    return found


def _unknown_key(src: str, key: str, known: list[str]) -> str:
    """The warning for a key we do not know, with the closest one we do ("did you mean …")."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = (
        f"did you mean {close[0]}?"
        if close
        else f"known here: {', '.join(k.rsplit('.', 1)[-1] for k in known)}"
    )
    return f"{src}: {key}: unknown key, ignored — {hint}"


def _auth_values(value: Any, src: str) -> dict[str, Any]:
    if value in (None, "", {}):
        return {}
    if not isinstance(value, dict) or set(value) - {"username", "password"}:
        raise ConfigError(
            f"{src}: server.auth: expected username: and password: (the dashboard's sign-in)"
        )
    return {f"server.auth.{k}": v for k, v in value.items()}


def parse_config(data: Any, src: str = "<config>") -> Config:
    """A Config from the file's (and the environment's) data; every error names the key."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{src}: the top level must be a mapping of sections (servers:, sync:, …)"
        )
    warnings = [_unknown_key(src, str(key), list(SECTIONS)) for key in data if key not in SECTIONS]
    values = {s.key: s.default for s in SETTINGS}
    for key, raw in _settings_in(data, src, warnings).items():
        values[key] = _coerce(SETTING[key], raw, f"{src}: {key}")
        if SETTING[key].kind == "choice" and str(raw).strip().upper() in ("MEMORY", "OFF"):
            warnings.append(
                f"{src}: {key}: {raw} would lose acknowledged webhooks in a crash; WAL is used"
            )
    if bool(values["server.auth.username"]) != bool(values["server.auth.password"]):
        raise ConfigError(f"{src}: server.auth: set both username and password, or leave auth out")
    servers = _parse_servers(data.get("servers"), src, warnings)
    if len(servers) < 2:
        warnings.append(
            f"{src}: servers: {len(servers)} server(s): nothing to sync until there are two or more"
        )
    nested = {
        name: cls(**{k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(name + ".")})
        for name, cls in (
            ("sync", SyncConfig),
            ("reconcile", ReconcileConfig),
            ("safety", SafetyConfig),
            ("alerts", AlertsConfig),
        )
    }
    users = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("users.")}
    users["map"] = _parse_map((data.get("users") or {}).get("map"), {s.name for s in servers}, src)
    top = {s.attr: values[s.key] for s in SETTINGS if s.attr}
    return Config(
        servers=servers,
        users=UsersConfig(**users),
        path_sync_policy=_parse_policies(data.get("path_sync_policy"), src, warnings),
        source=src,
        warnings=tuple(warnings),
        **nested,
        **top,
    )


def _parse_servers(raw: Any, src: str, warnings: list[str]) -> tuple[ServerConfig, ...]:
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise ConfigError(f"{src}: servers: a list of Jellyfin servers (name, url, api_key)")
    servers: list[ServerConfig] = []
    for i, entry in enumerate(raw):
        at = f"{src}: servers[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{at}: each server is a mapping with name, url and api_key")
        for key in entry:
            if key not in _SERVER_KEYS:
                warnings.append(_unknown_key(src, f"servers[{i}].{key}", sorted(_SERVER_KEYS)))
        for key in ("name", "url", "api_key"):
            if entry.get(key) in (None, ""):
                variable = f"JDS_SERVER_{i + 1}_{key.upper()}"
                raise ConfigError(
                    f"{at}.{key}: missing (in the file, or as the variable {variable})"
                )
        servers.append(_parse_server(entry, at, {s.name for s in servers}))
    return tuple(servers)


def _parse_server(entry: dict, at: str, seen: set[str]) -> ServerConfig:
    text = Setting("", "str", "", "")
    name = _coerce(text, entry["name"], f"{at}.name")
    if not _SERVER_NAME.match(name):
        raise ConfigError(
            f"{at}.name: {name!r}: use letters, digits, '.', '_' or '-' (it is part of the webhook "
            "URL)"
        )
    if name in seen:
        raise ConfigError(f"{at}.name: duplicate server name {name!r}")
    url = _coerce(text, entry["url"], f"{at}.url").rstrip("/")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"{at}.url: {url!r} is not an http:// or https:// URL")
    api_key = _coerce(Setting("", "key", "", ""), entry["api_key"], f"{at}.api_key")
    if not api_key:
        raise ConfigError(f"{at}.api_key: missing (only spaces or line breaks)")
    if api_key in EXAMPLE_API_KEYS:
        raise ConfigError(
            f"{at}.api_key: still the example value: paste the server's API key (Dashboard → API "
            "Keys)"
        )
    passwordless = _coerce(
        Setting("", "bool", False, ""), entry.get("passwordless", False), f"{at}.passwordless"
    )
    pmap = entry.get("path_map") or {}
    if not isinstance(pmap, dict):
        raise ConfigError(f"{at}.path_map: expected a mapping of 'server prefix: shared prefix'")
    path_map = tuple((normalise_path(str(k)), normalise_path(str(v))) for k, v in pmap.items())
    token = _coerce(
        Setting("", "token", "", ""), entry.get("webhook_token") or "", f"{at}.webhook_token"
    )
    return ServerConfig(name, url, api_key, passwordless, path_map, token)


def _parse_policies(raw: Any, src: str, warnings: list[str]) -> tuple[PathPolicy, ...]:
    policies = []
    for i, entry in enumerate(raw or []):
        at = f"{src}: path_sync_policy[{i}]"
        if not isinstance(entry, dict) or not entry.get("prefix"):
            raise ConfigError(f"{at}: each policy needs a prefix")
        for key in entry:
            if key not in _POLICY_KEYS:
                warnings.append(
                    _unknown_key(src, f"path_sync_policy[{i}].{key}", sorted(_POLICY_KEYS))
                )
        count = _coerce(
            Setting("", "int", 0, ""),
            entry.get("absent_retry_count", 0),
            f"{at}.absent_retry_count",
        )
        if count < -1:
            raise ConfigError(
                f"{at}.absent_retry_count: -1 (forever), 0 (no retry) or a positive count"
            )
        delay = _coerce(
            Setting("", "float", 300.0, ""),
            entry.get("retry_delay_seconds", 300),
            f"{at}.retry_delay_seconds",
        )
        policies.append(PathPolicy(normalise_path(str(entry["prefix"])), count, delay))
    return tuple(policies)


def _parse_map(raw: Any, servers: set[str], src: str) -> tuple[tuple[tuple[str, str], ...], ...]:
    """users.map: each entry one person, {server name: their user name there}."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(
            f"{src}: users.map: expected a list of {{server name: user name}} mappings"
        )
    groups = []
    for i, group in enumerate(raw):
        if not isinstance(group, dict) or len(group) < 2:
            raise ConfigError(
                f"{src}: users.map[{i}]: map at least two servers to a user name each"
            )
        for srv, name in group.items():
            if srv not in servers:
                raise ConfigError(f"{src}: users.map[{i}].{srv}: not a server name from servers:")
            if not isinstance(name, str) or not name.strip():
                raise ConfigError(f"{src}: users.map[{i}].{srv}: expected a user name")
        groups.append(tuple((str(k), str(v)) for k, v in group.items()))
    return tuple(groups)


def normalise_path(path: str) -> str:
    """Compare paths across servers: forward slashes, no trailing slash, case-folded.

    Windows servers use backslashes and case-insensitive paths (docs/jellyfin.md §2); folding case
    on Linux paths too costs nothing in practice and saves a class of mismatches.
    """
    p = path.replace("\\", "/").rstrip("/")
    return p.casefold()


# ── Store ────────────────────────────────────────────────────────────────────

SCHEMA_VERSION = 6
BUSY_TIMEOUT_MS = 30000  # how long a statement waits for another process's lock on the file
BUSY_MESSAGE = "database is busy (locked by another writer)"  # our write lock, waited for too long
# What an older file lacks that SCHEMA cannot add by itself, per version (N-1 → N), applied
# in order at start-up: columns added to tables it already has, and data moved to new meanings.
# Every table and index comes from SCHEMA alone (all CREATE … IF NOT EXISTS, run after these on
# every start), so every starting point — a new file, each of our earlier versions, the older
# program's file — ends with exactly a new file's schema (issue 21: a moved-over file once
# lacked two indexes).
MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: (),  # jobs_status_updated: an index, made by SCHEMA
    3: (),  # playlist_state: a new table, made by SCHEMA
    # The journal (issue 16): each write's values before and after, the person, the target's
    # item, and why it was made; jobs carry their cause; held changes are found by source.
    4: (
        "ALTER TABLE sync_log ADD COLUMN user_key TEXT",
        "ALTER TABLE sync_log ADD COLUMN item_id TEXT",
        "ALTER TABLE sync_log ADD COLUMN before TEXT",
        "ALTER TABLE sync_log ADD COLUMN after TEXT",
        "ALTER TABLE sync_log ADD COLUMN cause TEXT",
        "ALTER TABLE jobs ADD COLUMN cause TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE jobs ADD COLUMN removal INTEGER NOT NULL DEFAULT 0",
    ),
    # Issue 21: a change for an item its target does not have, with no path_sync_policy
    # waiting for it, ends 'absent' (no failure) instead of 'skipped': the ones already
    # skipped that way leave the waiting and failed list. (absent_count 0: never waited.)
    5: (
        "UPDATE jobs SET status='absent' WHERE status='skipped' AND absent_count=0"
        " AND id IN (SELECT job_id FROM sync_log WHERE result='absent')",
    ),
    # Issue 26: shows, seasons, albums, artists, collections and playlists are indexed too, with
    # their year (name + year matches a folder that has neither a path nor a provider id in
    # common): the next start reads each server's whole index again, not only what changed.
    6: (
        "ALTER TABLE items ADD COLUMN year INTEGER",
        "DELETE FROM meta WHERE key LIKE 'index_watermark:%'",
    ),
}
_ADD_COLUMN = re.compile(r"ALTER TABLE (\w+) ADD COLUMN (\w+)")
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- Every acknowledged webhook, exactly as received. planned = 1 once turned into jobs.
CREATE TABLE IF NOT EXISTS inbox (
    id INTEGER PRIMARY KEY, server TEXT NOT NULL, event TEXT NOT NULL,
    received_at REAL NOT NULL, body TEXT NOT NULL, planned INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS inbox_unplanned ON inbox (planned, id);
-- One desired field value for one target; coalesced while pending or waiting.
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY, target TEXT NOT NULL, source TEXT NOT NULL,
    user_key TEXT NOT NULL, username TEXT NOT NULL, source_item_id TEXT NOT NULL,
    item_name TEXT NOT NULL, field TEXT NOT NULL, value TEXT NOT NULL,
    observed_at REAL NOT NULL, extra TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    absent_count INTEGER NOT NULL DEFAULT 0, due_at REAL NOT NULL,
    last_error TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL,
    cause TEXT NOT NULL DEFAULT '', removal INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (target, status, due_at);
CREATE INDEX IF NOT EXISTS jobs_key ON jobs (target, user_key, source, source_item_id, field,
status);
CREATE INDEX IF NOT EXISTS jobs_status_updated ON jobs (status, updated_at);
-- The brake counts a source's removals for one person (Store.brake).
CREATE INDEX IF NOT EXISTS jobs_removal ON jobs (source, user_key, removal, created_at);
-- What we know of each server's state, per user and item and field: the value (from an
-- event, a read or our own write) and when it was observed (newest wins, docs/design.md §4).
CREATE TABLE IF NOT EXISTS state (
    server TEXT NOT NULL, user_key TEXT NOT NULL, item_id TEXT NOT NULL, field TEXT NOT NULL,
    value TEXT NOT NULL, observed_at REAL NOT NULL,
    PRIMARY KEY (server, user_key, item_id, field)) WITHOUT ROWID;
-- The full state we expect a server to report after each of our writes: its echo. Echoes of
-- two quick writes can arrive after both were made, so one "last value" is not enough.
CREATE TABLE IF NOT EXISTS expected_echo (
    id INTEGER PRIMARY KEY, server TEXT NOT NULL, user_key TEXT NOT NULL, item_id TEXT NOT NULL,
    snapshot TEXT NOT NULL, created_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS expected_echo_key ON expected_echo (server, user_key, item_id);
CREATE TABLE IF NOT EXISTS items (
    server TEXT NOT NULL, item_id TEXT NOT NULL, type TEXT NOT NULL, name TEXT NOT NULL,
    path_key TEXT, imdb TEXT, tmdb TEXT, tvdb TEXT, series_id TEXT, season INTEGER,
    episode INTEGER, runtime INTEGER, year INTEGER, PRIMARY KEY (server, item_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS items_path ON items (server, path_key);
CREATE INDEX IF NOT EXISTS items_imdb ON items (server, imdb);
CREATE INDEX IF NOT EXISTS items_tmdb ON items (server, tmdb);
CREATE INDEX IF NOT EXISTS items_tvdb ON items (server, tvdb);
CREATE INDEX IF NOT EXISTS items_episode ON items (server, series_id, season, episode);
CREATE TABLE IF NOT EXISTS users (
    server TEXT NOT NULL, user_id TEXT NOT NULL, name TEXT NOT NULL, name_key TEXT NOT NULL,
    is_admin INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (server, user_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS users_key ON users (server, name_key);
CREATE TABLE IF NOT EXISTS sync_log (
    id INTEGER PRIMARY KEY, at REAL NOT NULL, source TEXT NOT NULL, target TEXT NOT NULL,
    username TEXT NOT NULL, item_name TEXT NOT NULL, field TEXT NOT NULL, old TEXT, new TEXT,
    result TEXT NOT NULL, detail TEXT, job_id INTEGER,
    -- The journal: the person, the target's item, the values before and after (JSON, per field
    -- the write changed) and why: "event:<inbox id>", "pass:<n>", "undo:<n>", "import:<n>"…
    user_key TEXT, item_id TEXT, before TEXT, after TEXT, cause TEXT);
CREATE INDEX IF NOT EXISTS sync_log_at ON sync_log (at);
CREATE INDEX IF NOT EXISTS sync_log_cause ON sync_log (cause);
-- A value an undo put back on one server (class Undo): the servers then disagree on purpose, so
-- a pass leaves that field alone until the person changes it somewhere (decide()). A new table
-- only: an older program opening the file ignores it, so the schema version stays.
CREATE TABLE IF NOT EXISTS undone (
    server TEXT NOT NULL, user_key TEXT NOT NULL, item_id TEXT NOT NULL, field TEXT NOT NULL,
    value TEXT NOT NULL, cause TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (server, user_key, item_id, field)) WITHOUT ROWID;
-- The last agreed members of each person's playlist (by name), as cross-server item keys.
CREATE TABLE IF NOT EXISTS playlist_state (
    user_key TEXT NOT NULL, name_key TEXT NOT NULL, members TEXT NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (user_key, name_key)) WITHOUT ROWID;
-- Dashboard sign-ins, so a restart signs nobody out: the SHA-256 of each cookie, never the cookie.
CREATE TABLE IF NOT EXISTS sessions (
    token_hash TEXT PRIMARY KEY, expires_at REAL NOT NULL) WITHOUT ROWID;
-- RecentCheck: per server and person, the newest LastPlayedDate its played list showed (the
-- server's clock): reading further pages stops there.
CREATE TABLE IF NOT EXISTS recent_watermark (
    server TEXT NOT NULL, user_key TEXT NOT NULL, played_at REAL NOT NULL,
    PRIMARY KEY (server, user_key)) WITHOUT ROWID;
-- Generated passwords of accounts we created, until the operator acknowledges them.
CREATE TABLE IF NOT EXISTS passwords (
    id INTEGER PRIMARY KEY, server TEXT NOT NULL, username TEXT NOT NULL, password TEXT NOT NULL,
    created_at REAL NOT NULL);
"""


def _statements(script: str) -> list[str]:
    """An SQL script's statements, one by one (SQLite's own tokenizer says where each ends)."""
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf)
            buf = ""
    return out


def examine_database(path: str) -> tuple[str, int]:
    """What the file at ``path`` holds, read without changing it: ("ours", its schema version;
    0 for a new or absent file) or ("older", 0) for the older program's (its queue table and no
    meta table of ours). A file we cannot or must not use raises StoreError saying what to do:
    not SQLite, damaged, another application's tables (looked at, never touched), or a newer
    release's schema."""
    if path == ":memory:" or not Path(path).exists():
        return "ours", 0
    redo = "Move it away to start fresh, or put back a backup made with --backup."
    try:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            check = conn.execute("PRAGMA integrity_check").fetchone()[0]
            names = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            found = (
                conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                if "meta" in names
                else None
            )
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{path} is not a usable SQLite database ({e}). {redo}") from None
    if check != "ok":
        raise StoreError(f"{path} is damaged (integrity check: {check}). {redo}")
    if "meta" not in names and "pending_events" in names:  # Older program
        return "older", 0
    if "meta" not in names and {n for n in names if not n.startswith("sqlite_")}:
        raise StoreError(
            f"{path} holds another application's tables ({', '.join(sorted(names)[:4])}), not "
            "jellyfin-db-sync's; nothing was changed in it. Set database.path (JDS_DATABASE_PATH) "
            "to a file of its own."
        )
    version = int(found[0]) if found else 0
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} was written by a newer jellyfin-db-sync (schema {version}, this program knows "
            f"{SCHEMA_VERSION}): upgrade the program, or use a backup."
        )
    return "ours", version


@dataclass(frozen=True)
class Carried:
    """What a job carries besides its value (the jobs table's ``extra``, as JSON)."""

    event: str = ""  # what made it: a webhook's NotificationType, "reconcile", "import", "undo" …
    runtime: int | None = None  # the source item's runtime: a position keeps its fraction
    play_count: int | None = None  # the source's, written with "played"
    last_played: float | None = None  # the source's LastPlayedDate (or when it was seen)
    # What the target holds, as a pass read it at state_read_at ({} = in none of its lists):
    # a write soon after needs no second read of it (WatchStateWriter._target_state).
    target_state: dict | None = None
    state_read_at: float = 0.0
    undo_of: tuple[int, ...] = ()  # an undo's order: the journal entries it reverses…
    expect: Any = None  # …and the value we wrote, which must still be there to be undone

    @property
    def is_undo(self) -> bool:
        return bool(self.undo_of)

    def to_json(self) -> str:
        """Only what differs from the defaults (most jobs carry two or three keys)."""
        return json.dumps(
            {k: v for k, v in dataclasses.asdict(self).items() if v != _CARRIED_DEFAULTS[k]}
        )

    @classmethod
    def from_json(cls, raw: str | None) -> Carried:
        """Tolerant of rows written by earlier versions (keys they had that we no longer keep)."""
        data = json.loads(raw or "{}")
        known = {k: v for k, v in data.items() if k in _CARRIED_DEFAULTS}
        if "undo_of" in known:
            known["undo_of"] = tuple(known["undo_of"] or ())
        return cls(**known)


_CARRIED_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Carried)}


@dataclass(frozen=True)
class Job:
    id: int
    target: str
    source: str
    user_key: str
    username: str
    source_item_id: str
    item_name: str
    field: str
    value: Any
    observed_at: float
    extra: Carried
    attempts: int
    absent_count: int
    queued_at: float = 0.0  # when the change was first queued for this target
    waiting_since: float = 0.0  # when it was last put back to wait for its item (0: not waiting)
    status: str = "running"
    last_error: str | None = None
    due_at: float = 0.0
    cause: str = ""  # why it was queued: "event:<inbox id>", "pass:<n>", "undo:<n>", "import:<n>"


@dataclass(frozen=True)
class InboxRow:
    """One acknowledged webhook, as stored."""

    id: int
    server: str
    event: str
    received_at: float
    body: str


@dataclass(frozen=True)
class UserRow:
    """One account in a server's user index."""

    server: str
    user_id: str
    name: str
    is_admin: bool


@dataclass(frozen=True)
class LogEntry:
    """One line of the sync log: what was (or was not) written where."""

    id: int
    at: float
    source: str
    target: str
    username: str
    item_name: str
    field: str
    old: str | None
    new: str | None
    result: str
    detail: str | None
    job_id: int | None
    user_key: str | None = None  # the person
    target_item_id: str | None = None  # the target's item id (journal)
    before: dict | None = None  # journal: {field: value} before the write, and after it
    after: dict | None = None
    cause: str | None = None
    item_id: str | None = None  # the source's item id (from the job), where it is still known


# Most stored values are one of these (played, favourite, a like; no position): a pass reads tens
# of thousands, and a dictionary answers them without the JSON parser.
_JSON_WORDS = {"true": True, "false": False, "null": None, "0": 0}

_LOG_COLUMNS = (
    "l.id, l.at, l.source, l.target, l.username, l.item_name, l.field, l.old, l.new, l.result, "
    "l.detail,"
    " l.job_id, l.user_key, l.item_id, l.before, l.after, l.cause"
)


def _log_entry(r: tuple) -> LogEntry:
    """A LogEntry from a row of _LOG_COLUMNS (then, optionally, the source's item id)."""
    values = list(r)
    for i in (14, 15):  # before, after: JSON
        values[i] = json.loads(values[i]) if values[i] else None
    return LogEntry(*values)


@dataclass(frozen=True)
class Password:
    """A generated password, until the operator acknowledges it."""

    id: int
    server: str
    username: str
    password: str = dataclasses.field(repr=False)
    created_at: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Observation:
    """One field's value as a source reported it (a webhook) or a pass decided it, for the
    Planner. Built in one place per source: Syncer._observations (webhooks),
    Syncer._account_change (accounts) and Reconciler._queue (passes)."""

    server: str  # where it was seen: the source of the jobs it becomes
    user_key: str
    username: str
    item_id: str  # the source's item id ("-" for an account)
    item_name: str
    field: str
    value: Any
    observed_at: float
    targets: tuple[str, ...]
    extra: Carried = Carried()  # what the write needs besides the value
    delay: float = 0.0  # seconds before the job is due (debounce)
    # "report": the source's state, compared with what we know of it (echo, nothing new, older);
    # "order": a change decided elsewhere (a pass, an account event), queued as it is.
    kind: str = "report"
    cause: str = ""  # Job.cause


@dataclass(frozen=True)
class ItemInfo:
    server: str
    item_id: str
    type: str
    name: str
    path_key: str | None
    imdb: str | None
    tmdb: str | None
    tvdb: str | None
    series_id: str | None
    season: int | None
    episode: int | None
    runtime: int | None
    year: int | None = None  # ProductionYear: with the name, matches a folder nothing else does


@dataclass(frozen=True)
class OpenJob:
    """A job still waiting to be applied, as the Planner's coalescing needs it."""

    id: int
    observed_at: float
    status: str
    due_at: float


@dataclass(frozen=True)
class LogRow:
    """A sync log line, as a job's outcome writes it (and, with before/after, its journal entry)."""

    result: str
    old: str | None = None
    new: str | None = None
    detail: str | None = None
    item_id: str | None = None
    before: dict | None = None
    after: dict | None = None


@dataclass(frozen=True)
class Finished:
    """One job's outcome for Store.finish_jobs: its new status, its log line, what the target
    now holds (remember_states rows), and ("put" | "clear", item id there) for the undo marks."""

    job: Job
    status: str
    error: str | None = None
    log: LogRow | None = None
    states: list | None = None
    undo_mark: tuple[str, str] | None = None


class _Pending:
    """A webhook row waiting for the ingest thread's next commit."""

    __slots__ = ("row", "done", "id", "error")

    def __init__(self, row: tuple):
        self.row = row
        # Held until the commit: the request thread blocks acquiring it, the ingest thread
        # releases it. A bare lock, because an Event costs a Condition and a lock per wait.
        self.done = threading.Lock()
        self.done.acquire()
        self.id = 0
        self.error: Exception | None = None


def _store_errors(cls: type) -> type:
    """Class decorator: SQLite's errors leave the Store (and PlanTx) as StoreBusy or StoreError,
    so no other part needs to know the Store is SQLite."""
    for name, fn in list(vars(cls).items()):
        if not name.startswith("_") and inspect.isfunction(fn):
            setattr(cls, name, _translating(fn))
    return cls


def _translating(fn: Any) -> Any:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except sqlite3.OperationalError as e:
            raise StoreBusy(str(e)) from e
        except sqlite3.Error as e:
            raise StoreError(str(e)) from e

    return call


@_store_errors
class PlanTx:
    """The statements the Planner runs inside one transaction (Store.planning). Values are
    stored as JSON; ``state`` answers with that text, so "the same value" is compared exactly."""

    def __init__(self, c: sqlite3.Connection):
        self.c = c
        self.now = utcnow()

    def expected_echoes(self, server: str, user_key: str, item_id: str) -> list[tuple[int, dict]]:
        rows = self.c.execute(
            "SELECT id, snapshot FROM expected_echo WHERE server=? AND user_key=? AND item_id=? "
            "ORDER BY id",
            (server, user_key, item_id),
        ).fetchall()
        return [(r[0], json.loads(r[1])) for r in rows]

    def forget_echo(self, echo_id: int) -> None:
        self.c.execute("DELETE FROM expected_echo WHERE id=?", (echo_id,))

    def state(self, ob: Observation) -> tuple[str, float] | None:
        """What we last knew of this field on the observation's server: (value as JSON, when)."""
        row = self.c.execute(
            "SELECT value, observed_at FROM state WHERE server=? AND user_key=? AND item_id=? AND "
            "field=?",
            (ob.server, ob.user_key, ob.item_id, ob.field),
        ).fetchone()
        return (row[0], row[1]) if row else None

    def set_state(self, ob: Observation, value_json: str) -> None:
        self.c.execute(
            "INSERT OR REPLACE INTO state VALUES (?, ?, ?, ?, ?, ?)",
            (ob.server, ob.user_key, ob.item_id, ob.field, value_json, ob.observed_at),
        )

    def open_job(self, target: str, ob: Observation) -> OpenJob | None:
        """The job for the same change still waiting to be applied."""
        row = self.c.execute(
            "SELECT id, observed_at, status, due_at FROM jobs WHERE target=? AND user_key=? AND "
            "source=? "
            "AND source_item_id=? AND field=? AND status IN ('pending', 'waiting', 'unreachable', "
            "'held')",
            (target, ob.user_key, ob.server, ob.item_id, ob.field),
        ).fetchone()
        return OpenJob(*row) if row else None

    def add_job(self, target: str, ob: Observation, removal: bool, due_at: float) -> None:
        self.c.execute(
            "INSERT INTO jobs (target, source, user_key, username, source_item_id, item_name,"
            " field, value, observed_at, extra, status, due_at, created_at, updated_at, cause, "
            "removal)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?)",
            (
                target,
                ob.server,
                ob.user_key,
                ob.username,
                ob.item_id,
                ob.item_name,
                ob.field,
                json.dumps(ob.value),
                ob.observed_at,
                ob.extra.to_json(),
                due_at,
                self.now,
                self.now,
                ob.cause,
                int(removal),
            ),
        )

    def replace_job(
        self, job_id: int, ob: Observation, removal: bool, due_at: float, status: str
    ) -> None:
        """A newer desired state for a waiting job (the Planner decides its due time and status)."""
        self.c.execute(
            "UPDATE jobs SET value=?, observed_at=?, extra=?, item_name=?, updated_at=?, cause=?, "
            "removal=?,"
            " due_at=?, status=? WHERE id=?",
            (
                json.dumps(ob.value),
                ob.observed_at,
                ob.extra.to_json(),
                ob.item_name,
                self.now,
                ob.cause,
                int(removal),
                due_at,
                status,
                job_id,
            ),
        )

    def count_removals(self, source: str, user_key: str, since: float) -> int:
        """Items that lost state (removal jobs) from ``source`` for one person since ``since``."""
        return self.c.execute(
            "SELECT count(DISTINCT source_item_id) FROM jobs WHERE source=? AND user_key=? "
            "AND removal=1 AND created_at>=? AND status NOT IN ('discarded', 'superseded')",
            (source, user_key, since),
        ).fetchone()[0]

    def hold_removals(self, source: str, user_key: str, since: float) -> int:
        """Hold every removal from ``source`` for one person since ``since`` not yet applied;
        returns how many jobs that holds."""
        return self.c.execute(
            "UPDATE jobs SET status='held', updated_at=? WHERE source=? AND user_key=? AND "
            "removal=1 "
            "AND created_at>=? AND status IN ('pending', 'waiting', 'unreachable')",
            (self.now, source, user_key, since),
        ).rowcount

    def brake_announced(self, source: str, user_key: str, held: bool) -> float:
        """When the brake last held changes from ``source`` for this person (0: never, or
        discarded since); with ``held``, that is now. The WARNING is said once per burst."""
        key = f"brake_held:{source}:{user_key}"
        row = self.c.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        if held:
            self.c.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, self.now)
            )
        return float(row[0]) if row else 0.0

    def mark_planned(self, inbox_ids: list[int]) -> None:
        self.c.executemany("UPDATE inbox SET planned = 1 WHERE id = ?", [(i,) for i in inbox_ids])


_PARTIAL = "_partial"  # key in a reconciliation's UserData known only from the played list


def _pass_user_data(played: int, favorite: int, likes: int, full: str | None) -> dict:
    """A pass_seen row as Reconciler._read describes it: the UserData a list carried, else what
    being in the played, favourite and liked lists says ({"Played": True, _PARTIAL: True}…)."""
    if full is not None:
        return json.loads(full)
    out: dict[str, Any] = {_PARTIAL: True}
    for flag, on in (("Played", played), ("IsFavorite", favorite), ("Likes", likes)):
        if on:
            out[flag] = True
    return out


@_store_errors
class Store:
    """The SQLite file: schema, and every SQL statement the program runs.

    One connection per thread; all writes go through ``_write_lock`` so that threads queue in
    Python instead of spinning in SQLite's busy handler (which sleeps in coarse steps and would
    put tens of milliseconds on a webhook's answer).
    """

    def __init__(self, path: str, journal_mode: str = "WAL"):
        self.path = path
        self.journal_mode = journal_mode
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._ingest_cond = threading.Condition()  # guards _ingest_queue and _ingest_thread
        self._ingest_queue: list[_Pending] = []
        self._ingest_thread: threading.Thread | None = None
        self._ingest_idle = False  # the ingest thread waits for rows: the next one must notify it
        self._ingest_gathering = False  # it waits for a batch to fill: a full one must notify it
        self._last_batch = 0
        self._window = (0.0, 0)  # (monotonic start, webhooks committed since) of the burst window
        self._burst_at = 0.0  # when a window last filled with INTAKE_BURST_ROWS: a burst is on
        # Why the last webhook could not be committed (disk full, I/O error), until one can:
        # readiness then tries a write of its own, so it recovers without waiting for a webhook.
        self.intake_error: str | None = None
        try:
            self._open()
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the database {path}: {e}") from None

    def _open(self) -> None:
        """Check the file, create or upgrade the schema, release jobs a crash left running."""
        path = self.path
        if path != ":memory:":
            problem = folder_problem(path)
            if problem:
                raise StoreError(problem)  # not "damaged": nothing is wrong with the file
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        kind, version = examine_database(path)  # before our connection sets WAL mode on it
        if path != ":memory:":
            # Its owner's only: it holds generated passwords and everyone's history. SQLite
            # gives its -wal and -shm files the database file's mode.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            for name in (path, f"{path}-wal", f"{path}-shm"):
                with suppress(FileNotFoundError):
                    if os.stat(name).st_mode & 0o077:
                        os.chmod(name, 0o600)
        conn = self._conn()
        with self._write_lock:
            if kind == "older":  # Older program
                OlderDatabase(path, conn).migrate()
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Columns first (an index of SCHEMA may name one), then every missing table and
                # index: also repairs a file an earlier release left without one.
                for n in range(version + 1, SCHEMA_VERSION + 1) if version else ():  # 0: a new file
                    for statement in MIGRATIONS.get(n, ()):
                        added = _ADD_COLUMN.match(statement)
                        if not added:
                            conn.execute(statement)  # data: its tables are there since schema 1
                            continue
                        columns = {r[1] for r in conn.execute(f"PRAGMA table_info({added[1]})")}
                        if (
                            columns and added[2] not in columns
                        ):  # no table yet: SCHEMA makes it whole
                            conn.execute(statement)
                for statement in _statements(
                    SCHEMA
                ):  # in this transaction (executescript would commit)
                    conn.execute(statement)
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            if version and version < SCHEMA_VERSION:
                log.info("database %s upgraded from schema %d to %d", path, version, SCHEMA_VERSION)
            # A job left 'running' by a crash or a kill is released: applying it again is
            # harmless because jobs carry state, not deltas (docs/design.md §2, §5).
            conn.execute("UPDATE jobs SET status = 'pending' WHERE status = 'running'")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA journal_mode = {self.journal_mode}")
            # FULL: in WAL mode every commit is fsynced before we answer the webhook, so an
            # acknowledged event survives a power cut, not only a crash (NORMAL would not).
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute(f"PRAGMA cache_size = -{SQLITE_PAGE_CACHE_KIB}")  # negative: in KiB
            conn.execute(
                "PRAGMA secure_delete = ON"
            )  # deleted rows (generated passwords) are zeroed
            conn.execute("PRAGMA foreign_keys = ON")
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    @staticmethod
    @contextmanager
    def _transaction(conn: sqlite3.Connection, begin: str) -> Iterator[sqlite3.Connection]:
        """``begin``, then COMMIT, or ROLLBACK on any exception."""
        conn.execute(begin)
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        with self._write_lock, self._transaction(conn, "BEGIN IMMEDIATE"):
            yield conn

    def relax_durability(self) -> None:
        """This thread's commits: durable across a crash, not necessarily a power cut."""
        self._conn().execute("PRAGMA synchronous = NORMAL")

    def _rows(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        return self._conn().execute(sql, args).fetchall()

    def close(self) -> None:
        with self._conns_lock:
            for c in self._conns:
                with suppress(sqlite3.Error):
                    c.close()
            self._conns.clear()

    # inbox
    def add_event(self, server: str, event: str, body: str) -> int:
        """Commit one webhook durably and return its id; raises sqlite3.Error if it cannot be.

        Group commit: request threads hand their row to one writer thread and wait; the writer
        commits everything that queued up during the previous commit (in a burst, after waiting
        up to INGEST_GATHER_SECONDS for more) in one statement, so N concurrent senders cost one
        fsync, not N. Nobody returns before their row is committed.
        """
        entry = _Pending((server, event, utcnow(), body))
        with self._ingest_cond:
            if self._ingest_thread is None:
                self._ingest_thread = threading.Thread(
                    target=self._ingest_loop, name="ingest", daemon=True
                )
                self._ingest_thread.start()
            self._ingest_queue.append(entry)
            if (
                self._ingest_idle
                or self._ingest_gathering
                and len(self._ingest_queue) >= INGEST_GATHER_ROWS
            ):
                self._ingest_cond.notify()
        entry.done.acquire()
        if entry.error is not None:
            raise entry.error
        return entry.id

    def _ingest_loop(self) -> None:
        # Jellyfin waits for our answer while a player waits for Jellyfin: if the file stays
        # locked for 2 s, answer 503 (logged by Jellyfin) rather than hang.
        self._conn().execute("PRAGMA busy_timeout = 2000")
        while True:
            with self._ingest_cond:
                while not self._ingest_queue:
                    self._ingest_idle = True
                    self._ingest_cond.wait()
                    self._ingest_idle = False
                if self._last_batch > 1 and len(self._ingest_queue) < INGEST_GATHER_ROWS:
                    # Several senders at once (the last commit carried more than one row): give
                    # the others a moment to join this commit. Fewer, fuller commits cost the
                    # GIL-bound request threads less (measured: -15% CPU per webhook at 8
                    # senders); a lone webhook never waits.
                    self._ingest_gathering = True
                    self._ingest_cond.wait(INGEST_GATHER_SECONDS)
                    self._ingest_gathering = False
                batch, self._ingest_queue = self._ingest_queue[:500], self._ingest_queue[500:]
            self._last_batch = len(batch)
            try:
                # One multi-row INSERT in autocommit mode: a single statement, so this thread
                # gives up the GIL once per batch (for the write and fsync) instead of once per
                # statement; each hand-back can wait behind the request threads' parsing.
                values = ",".join(["(?, ?, ?, ?)"] * len(batch))
                args = [v for e in batch for v in e.row]
                conn = self._conn()
                # Another thread may hold the write lock while SQLite waits on a locked file:
                # wait at most as long as SQLite itself would, then answer 503.
                if not self._write_lock.acquire(timeout=2.0):
                    raise sqlite3.OperationalError(BUSY_MESSAGE)
                try:
                    last = conn.execute(
                        f"INSERT INTO inbox (server, event, received_at, body) VALUES {values}",
                        args,
                    ).lastrowid
                finally:
                    self._write_lock.release()
                for i, e in enumerate(batch):  # rowids of one statement are consecutive
                    e.id = last - len(batch) + 1 + i
                self._count_burst(len(batch))
                self.intake_error = None
            except Exception as exc:  # disk full, locked, I/O error: every sender gets a 503
                for e in batch:
                    e.id, e.error = 0, exc
                if "locked" not in str(exc) and "busy" not in str(exc):  # a lock passes by itself
                    self.intake_error = str(exc)
            for e in batch:
                e.done.release()

    def _count_burst(self, rows: int) -> None:
        """The ingest thread's count of committed webhooks, for yield_to_intake. Only commits
        of several count: one sender at a time waits for each answer, and is no burst."""
        if rows < 2:
            return
        now = time.monotonic()
        start, count = self._window
        if now - start > INTAKE_BURST_SECONDS:
            start, count = now, 0
        count += rows
        if count >= INTAKE_BURST_ROWS:
            self._burst_at, start, count = now, now, 0
        self._window = (start, count)

    def yield_to_intake(self) -> None:
        """Intake first: while a burst of webhooks is on (INTAKE_BURST_ROWS committed within
        INTAKE_BURST_SECONDS), wait until it passes, for at most INTAKE_YIELD_SECONDS. The
        planner and the writers call this before each batch of theirs. Planning, writing and
        the target servers answering the writes take the CPU the request threads need (a
        NAS has two cores or so): measured with 2,000 distinct changes from 8 senders, each
        written to two targets, webhooks were answered at ~800/s instead of ~2,000/s, with
        twice the delay. Deferred, the changes are still all written as soon as before (they
        catch up at full speed when the burst ends); a burst that never ends slows each of
        them to a batch per INTAKE_YIELD_SECONDS (a second), never stops them. A few webhooks
        at once are no burst: their changes are planned and written at once."""
        deadline = time.monotonic() + INTAKE_YIELD_SECONDS
        while (wait := min(self._burst_at + INTAKE_BURST_SECONDS, deadline) - time.monotonic()) > 0:
            time.sleep(wait)

    def intake_burst(self) -> bool:
        """Is a burst of webhooks on now (see yield_to_intake)?"""
        return time.monotonic() - self._burst_at < INTAKE_BURST_SECONDS

    def unplanned_events(self, limit: int = 200) -> list[InboxRow]:
        rows = self._rows(
            "SELECT id, server, event, received_at, body FROM inbox WHERE planned = 0 ORDER BY id "
            "LIMIT ?",
            (limit,),
        )
        return [InboxRow(*r) for r in rows]

    def count_unplanned(self) -> int:
        return self._rows("SELECT count(*) FROM inbox WHERE planned = 0")[0][0]

    def recent_watermark(self, server: str, user_key: str) -> float | None:
        rows = self._rows(
            "SELECT played_at FROM recent_watermark WHERE server=? AND user_key=?",
            (server, user_key),
        )
        return rows[0][0] if rows else None

    def set_recent_watermark(self, server: str, user_key: str, played_at: float) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO recent_watermark VALUES (?, ?, ?)",
                (server, user_key, played_at),
            )

    def last_event_at(self) -> dict[str, float]:
        rows = self._rows("SELECT server, max(received_at) FROM inbox GROUP BY server")
        return {r[0]: r[1] for r in rows}

    def mark_webhook_setup(self, server: str) -> None:
        """The Webhook plugin was just set up for ``server``: its first webhook is awaited (the
        inbox's last id now is where to look for it)."""
        with self._tx() as c:
            after = c.execute("SELECT coalesce(max(id), 0) FROM inbox").fetchone()[0]
            setup = {"at": utcnow(), "after": after, "first": None}
            c.execute(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                (f"webhook_setup:{server}", json.dumps(setup)),
            )

    def webhook_setup(self, server: str) -> dict | None:
        """When the Webhook plugin was set up for ``server`` ("at") and when the first webhook
        since arrived ("first", None while awaited), or None if it never was set up here."""
        raw = self.get_meta(f"webhook_setup:{server}")
        if raw is None:
            return None
        setup = json.loads(raw)
        if setup["first"] is None:
            # By id, not by time: a webhook stamped just before the set-up may commit after it.
            # Only the rows since the set-up are read (last_event_at reads them all).
            rows = self._rows(
                "SELECT received_at FROM inbox WHERE id > ? AND server = ? ORDER BY id LIMIT 1",
                (setup["after"], server),
            )
            if rows:
                setup["first"] = rows[0][0]
                # Kept, once: retention prunes that webhook one day. Only a cache of what the
                # inbox says today, so a busy database just means it is kept another time.
                with suppress(sqlite3.Error):
                    self.set_meta(f"webhook_setup:{server}", json.dumps(setup))
        return setup

    # planning: the Planner's statements, one transaction per batch of inbox rows
    @contextmanager
    def planning(self) -> Iterator[PlanTx]:
        """A transaction for the Planner: PlanTx's statements, committed together (one fsync
        for a whole batch) or not at all."""
        try:
            with self._tx() as c:
                yield PlanTx(c)
        except sqlite3.OperationalError as e:
            raise StoreBusy(str(e)) from e
        except sqlite3.Error as e:
            raise StoreError(str(e)) from e

    def fail_events(self, failures: list[tuple[InboxRow, str]]) -> None:
        """Inbox rows that cannot be planned: each is marked failed (planned = 2) and shown as a
        failed change of its own (field 'event', its source server as target, the inbox id as
        item), so an operator sees it beside the others, can retry it (after an upgrade, say)
        or discard it — and the rows behind it are planned meanwhile."""
        now = utcnow()
        with self._tx() as c:
            for row, error in failures:
                c.execute("UPDATE inbox SET planned = 2 WHERE id = ?", (row.id,))
                what = f"webhook #{row.id} ({row.event})"
                cur = c.execute(
                    "INSERT INTO jobs (target, source, user_key, username, source_item_id, "
                    "item_name, field,"
                    " value, observed_at, extra, status, due_at, last_error, created_at, "
                    "updated_at)"
                    " VALUES (?, ?, '', '', ?, ?, 'event', 'null', ?, ?, 'failed', ?, ?, ?, ?)",
                    (
                        row.server,
                        row.server,
                        str(row.id),
                        what,
                        row.received_at,
                        json.dumps({"event": row.event}),
                        now,
                        error,
                        now,
                        now,
                    ),
                )
                c.execute(
                    "INSERT INTO sync_log (at, source, target, username, item_name, field, result, "
                    "detail, job_id)"
                    " VALUES (?, ?, ?, '', ?, 'event', 'failed', ?, ?)",
                    (now, row.server, row.server, what, error, cur.lastrowid),
                )

    def prune(self, older_than: float) -> int:
        """Forget echo expectations that never came back (the plugin may not send every type)."""
        with self._tx() as c:
            return c.execute(
                "DELETE FROM expected_echo WHERE created_at < ?", (older_than,)
            ).rowcount

    def prune_history(self, before: float) -> int:
        """Retention: finished jobs, planned webhooks and log lines older than ``before`` go, so
        the file stops growing. Pending, waiting and failed work is never pruned."""
        with self._tx() as c:
            n = c.execute("DELETE FROM sync_log WHERE at < ?", (before,)).rowcount
            n += c.execute(
                "DELETE FROM jobs WHERE status IN ('done', 'absent', 'superseded', 'discarded', "
                "'resolved') "
                "AND updated_at < ?",
                (before,),
            ).rowcount
            # Failed webhooks stay while their failed change is shown (retry needs the body).
            n += c.execute(
                "DELETE FROM inbox WHERE planned != 0 AND received_at < ? AND id NOT IN"
                " (SELECT CAST(source_item_id AS INTEGER) FROM jobs WHERE field='event' AND "
                "status='failed')",
                (before,),
            ).rowcount
            return n

    def backup(self, dest: str) -> int:
        """An online copy (the service may keep running): SQLite's backup API, into a new file
        that is its owner's only (it holds generated passwords). Returns bytes."""
        try:
            os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            raise StoreError(
                f"{dest} exists already: give the backup a new name, or remove it first"
            ) from None
        target = sqlite3.connect(dest)
        try:
            self._conn().backup(target)
        finally:
            target.close()
        return os.path.getsize(dest)

    # jobs
    def claim_jobs(self, target: str, now: float, groups: int = CLAIM_GROUPS) -> list[list[Job]]:
        """Claim up to ``groups`` groups of due jobs in one commit: each group is the due jobs
        for one user and item, so one read of the target's state serves them all (favourite +
        like from one click, say). One query finds them (a group cut off by its LIMIT keeps
        the rest for the next claim, after this one: the item is then 'running')."""
        with self._tx() as c:
            # Not an item another writer of this target is working on: writes to one item
            # stay in order (sync.write_connections writers share a target).
            rows = c.execute(
                "SELECT * FROM jobs j WHERE target=? AND status IN ('pending', 'waiting') AND "
                "due_at<=? "
                "AND NOT EXISTS (SELECT 1 FROM jobs r WHERE r.target=j.target AND "
                "r.user_key=j.user_key "
                "AND r.source=j.source AND r.source_item_id=j.source_item_id AND "
                "r.status='running') "
                "ORDER BY due_at, id LIMIT ?",
                (target, now, groups * CLAIM_ROWS_PER_GROUP),
            ).fetchall()
            by_item: dict[tuple[str, str, str], list[sqlite3.Row]] = {}
            for r in rows:
                key = (r["user_key"], r["source"], r["source_item_id"])
                if key in by_item or len(by_item) < groups:
                    by_item.setdefault(key, []).append(r)
            c.executemany(
                "UPDATE jobs SET status='running', updated_at=? WHERE id=?",
                [(now, r["id"]) for group in by_item.values() for r in group],
            )
        return [[self._job(r) for r in group] for group in by_item.values()]

    @staticmethod
    def _job(r: sqlite3.Row) -> Job:
        return Job(
            r["id"],
            r["target"],
            r["source"],
            r["user_key"],
            r["username"],
            r["source_item_id"],
            r["item_name"],
            r["field"],
            json.loads(r["value"]),
            r["observed_at"],
            Carried.from_json(r["extra"]),
            r["attempts"],
            r["absent_count"],
            r["created_at"],
            r["updated_at"] if r["status"] == "waiting" else 0.0,
            r["status"],
            r["last_error"],
            r["due_at"],
            r["cause"],
        )

    def next_due(self, target: str) -> float | None:
        row = self._rows(
            "SELECT min(due_at) FROM jobs WHERE target=? AND status IN ('pending', 'waiting')",
            (target,),
        )
        return row[0][0]

    def finish_jobs(self, finished: list[Finished]) -> None:
        """The outcomes of the jobs one claim took, in one commit. A writer's commits, not its
        writes, were what the other writers queued behind."""
        now = utcnow()
        with self._tx() as c:
            for f in finished:
                self._finish(c, now, f)

    def _finish(self, c: sqlite3.Connection, now: float, f: Finished) -> None:
        job, log_row = f.job, f.log
        if f.states:
            self._write_states(c, f.states)
        c.execute(
            "UPDATE jobs SET status=?, last_error=?, updated_at=? WHERE id=?",
            (f.status, f.error, now, job.id),
        )
        if f.undo_mark and f.undo_mark[0] == "put":
            c.execute(
                "INSERT OR REPLACE INTO undone VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    job.target,
                    job.user_key,
                    f.undo_mark[1],
                    job.field,
                    json.dumps(job.value),
                    job.cause,
                    now,
                ),
            )
        elif f.undo_mark:
            c.execute(
                "DELETE FROM undone WHERE server=? AND user_key=? AND item_id=? AND field=?",
                (job.target, job.user_key, f.undo_mark[1], job.field),
            )
        if log_row:
            before, after = log_row.before, log_row.after
            c.execute(
                "INSERT INTO sync_log (at, source, target, username, item_name, field, old, new,"
                " result, detail, job_id, user_key, item_id, before, after, cause)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    now,
                    job.source,
                    job.target,
                    job.username,
                    job.item_name,
                    job.field,
                    log_row.old,
                    log_row.new,
                    log_row.result,
                    log_row.detail,
                    job.id,
                    job.user_key,
                    log_row.item_id,
                    None if before is None else json.dumps(before),
                    None if after is None else json.dumps(after),
                    job.cause,
                ),
            )

    def reschedule_job(
        self,
        job: Job,
        status: str,
        due_at: float,
        error: str,
        *,
        absent: bool = False,
        attempt: bool = True,
    ) -> None:
        """Put a job back: 'pending' for a retry after an error, 'waiting' for an absent item,
        'unreachable' until its server answers again (no attempt counted: ``attempt``)."""
        with self._tx() as c:
            # If a newer job for the same key was queued while this one ran, it supersedes us.
            newer = c.execute(
                "SELECT 1 FROM jobs WHERE target=? AND user_key=? AND source=? AND "
                "source_item_id=? "
                "AND field=? AND status IN ('pending', 'waiting', 'unreachable') AND id != ?",
                (job.target, job.user_key, job.source, job.source_item_id, job.field, job.id),
            ).fetchone()
            if newer:
                c.execute(
                    "UPDATE jobs SET status='superseded', updated_at=? WHERE id=?",
                    (utcnow(), job.id),
                )
                return
            c.execute(
                "UPDATE jobs SET status=?, due_at=?, last_error=?, updated_at=?,"
                " attempts = attempts + ?, absent_count = absent_count + ? WHERE id=?",
                (
                    status,
                    due_at,
                    error,
                    utcnow(),
                    int(attempt and not absent),
                    1 if absent else 0,
                    job.id,
                ),
            )

    def retry_job(self, job_id: int) -> bool:
        """Operator's retry: a failed, skipped or waiting job becomes due now; a webhook that
        could not be planned goes back to the planner."""
        with self._tx() as c:
            event = c.execute(
                "SELECT source_item_id FROM jobs WHERE id=? AND field='event' AND status='failed'",
                (job_id,),
            ).fetchone()
            if event is not None:
                c.execute(
                    "UPDATE inbox SET planned = 0 WHERE id = ? AND planned = 2", (int(event[0]),)
                )
                c.execute(
                    "UPDATE jobs SET status='superseded', updated_at=? WHERE id=?",
                    (utcnow(), job_id),
                )
                return True
            cur = c.execute(
                "UPDATE jobs SET status='pending', due_at=?, attempts=0, absent_count=0, "
                "updated_at=?"
                " WHERE id=? AND status IN ('failed', 'waiting', 'unreachable', 'skipped')",
                (utcnow(), utcnow(), job_id),
            )
            return cur.rowcount == 1

    def retry_all(self) -> tuple[int, list[str]]:
        """Operator's "Retry all": every failed job is due now, every failed webhook goes back
        to the planner. Returns (how many, the targets to wake)."""
        now = utcnow()
        with self._tx() as c:
            events = c.execute(
                "UPDATE inbox SET planned = 0 WHERE planned = 2 AND id IN "
                "(SELECT CAST(source_item_id AS INTEGER) FROM jobs WHERE field='event' AND "
                "status='failed')"
            ).rowcount
            c.execute(
                "UPDATE jobs SET status='superseded', updated_at=? WHERE field='event' AND "
                "status='failed'",
                (now,),
            )
            targets = [
                r[0] for r in c.execute("SELECT DISTINCT target FROM jobs WHERE status='failed'")
            ]
            n = c.execute(
                "UPDATE jobs SET status='pending', due_at=?, attempts=0, absent_count=0, "
                "updated_at=?"
                " WHERE status='failed'",
                (now, now),
            ).rowcount
        return n + events, targets

    def failed_jobs(self, target: str, limit: int) -> list[Job]:
        """Failed watch-state and preference changes for ``target``, newest first."""
        fields = (*FIELDS, *PREFERENCES)
        rows = self._rows(
            "SELECT * FROM jobs WHERE target=? AND status='failed' AND field IN "
            f"({', '.join('?' * len(fields))})"
            " ORDER BY id DESC LIMIT ?",
            (target, *fields, limit),
        )
        return [self._job(r) for r in rows]

    def mark_resolved(self, job_ids: list[int]) -> None:
        """Failed jobs whose target now holds what they wanted: no longer anyone's problem."""
        with self._tx() as c:
            c.executemany(
                "UPDATE jobs SET status='resolved', updated_at=? WHERE id=? AND status='failed'",
                [(utcnow(), i) for i in job_ids],
            )

    def wake_unreachable(self, target: str) -> int:
        """``target`` answers again: what waited for it is due now."""
        with self._tx() as c:
            return c.execute(
                "UPDATE jobs SET status='pending', due_at=?, updated_at=? WHERE target=? AND "
                "status='unreachable'",
                (utcnow(), utcnow(), target),
            ).rowcount

    def discard_job(self, job_id: int) -> bool:
        """Operator's discard: a failed, skipped or waiting job is dropped (kept as 'discarded')."""
        with self._tx() as c:
            cur = c.execute(
                "UPDATE jobs SET status='discarded', updated_at=? "
                "WHERE id=? AND status IN ('failed', 'waiting', 'unreachable', 'skipped', "
                "'resolved')",
                (utcnow(), job_id),
            )
            return cur.rowcount == 1

    def job_target(self, job_id: int) -> str | None:
        rows = self._rows("SELECT target FROM jobs WHERE id=?", (job_id,))
        return rows[0][0] if rows else None

    def timeline(self, minutes: int, bucket: int = 60, now: float | None = None) -> list[dict]:
        """Changes (CHANGE_RESULTS) per ``bucket`` seconds in the last ``minutes``' whole buckets,
        the current one included, by result (ok, failed, other) — for the dashboard's charts and
        its "changes in the last hour", which must count the same lines; the query is bounded by
        the sync_log_at index."""
        since = timeline_start(minutes, bucket, utcnow() if now is None else now)
        rows = self._rows(
            "SELECT CAST(at / ? AS INTEGER) AS slot, result, count(*) FROM sync_log WHERE at >= ? "
            f"AND result IN ({','.join('?' * len(CHANGE_RESULTS))}) GROUP BY slot, result ORDER BY "
            "slot",
            (bucket, since, *CHANGE_RESULTS),
        )
        out: dict[int, dict] = {}
        for slot, result, n in rows:
            out.setdefault(
                slot, {"minute": format_time(slot * bucket), "ok": 0, "failed": 0, "other": 0}
            )
            key = result if result in ("ok", "failed") else "other"
            out[slot][key] += n
        return list(out.values())

    def done_since(self, since: float) -> int:
        return self._rows(
            "SELECT count(*) FROM jobs WHERE status='done' AND updated_at >= ?", (since,)
        )[0][0]

    def wake_waiting(self, target: str) -> int:
        """An item was added on ``target``: jobs waiting for an item there are due now."""
        with self._tx() as c:
            return c.execute(
                "UPDATE jobs SET due_at=? WHERE target=? AND status='waiting'", (utcnow(), target)
            ).rowcount

    def job_counts(self) -> dict[str, int]:
        rows = self._rows("SELECT status, count(*) FROM jobs GROUP BY status")
        return {r[0]: r[1] for r in rows}

    def open_job_counts(self) -> dict[str, int]:
        """Counts of the jobs not finished: a range of the status index, not the whole history."""
        rows = self._rows(
            "SELECT status, count(*) FROM jobs WHERE status IN ('pending', 'running', 'waiting', "
            "'failed', 'skipped', "
            "'held', 'unreachable')"
            " GROUP BY status"
        )
        return {r[0]: r[1] for r in rows}

    def count_done(self) -> int:
        return self._rows("SELECT count(*) FROM jobs WHERE status = 'done'")[0][0]

    def jobs_by_status(
        self, statuses: tuple[str, ...], limit: int = 50, offset: int = 0, since: float = 0.0
    ) -> list[Job]:
        """Newest first; ``since``: only those changed since then."""
        marks = ",".join("?" * len(statuses))
        rows = self._rows(
            f"SELECT * FROM jobs WHERE status IN ({marks}) AND updated_at >= ? ORDER BY id DESC "
            "LIMIT ? OFFSET ?",
            (*statuses, since, limit, offset),
        )
        return [self._job(r) for r in rows]

    def oldest_live_job_age(self) -> float | None:
        row = self._rows("SELECT min(created_at) FROM jobs WHERE status IN ('pending', 'running')")
        return None if row[0][0] is None else utcnow() - row[0][0]

    # state
    def get_state(self, server: str, user_key: str, item_id: str) -> dict[str, tuple[Any, float]]:
        rows = self._rows(
            "SELECT field, value, observed_at FROM state WHERE server=? AND user_key=? AND "
            "item_id=?",
            (server, user_key, item_id),
        )
        return {r[0]: (json.loads(r[1]), r[2]) for r in rows}

    def playlist_members(self, user_key: str, name_key_: str) -> list[str] | None:
        rows = self._rows(
            "SELECT members FROM playlist_state WHERE user_key=? AND name_key=?",
            (user_key, name_key_),
        )
        return json.loads(rows[0][0]) if rows else None

    def set_playlist_members(self, user_key: str, name_key_: str, members: list[str]) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO playlist_state VALUES (?, ?, ?, ?)",
                (user_key, name_key_, json.dumps(members), utcnow()),
            )

    def changes_on_the_way(self, user_key: str) -> set[tuple[str, str, str]]:
        """(source, source item, field) of a person's changes still to be written — settling,
        waiting, held by the brake, running, or owed to a server that is away."""
        rows = self._rows(
            "SELECT DISTINCT source, source_item_id, field FROM jobs WHERE user_key=? "
            "AND status IN ('pending', 'waiting', 'running', 'held', 'unreachable')",
            (user_key,),
        )
        return {tuple(r) for r in rows}

    def states_of(
        self, server: str, user_key: str, item_ids: list[str]
    ) -> dict[str, dict[str, tuple]]:
        """What is known of one person on one server for these items (a page of a pass, at most
        a few hundred): {item id: {field: (value, observed)}}. Not all of them at once: after a
        pass that is four rows for every item the person has state on (issue 25)."""
        out: dict[str, dict[str, tuple[Any, float]]] = {}
        if not item_ids:
            return out
        for item_id, fld, value, at in self._rows(
            "SELECT item_id, field, value, observed_at FROM state"
            f" WHERE server=? AND user_key=? AND item_id IN {IN_LIST}",
            (server, user_key, json.dumps(item_ids)),
        ):
            out.setdefault(item_id, {})[fld] = (
                _JSON_WORDS[value] if value in _JSON_WORDS else json.loads(value),
                at,
            )
        return out

    def undone_of(self, user_key: str) -> dict[tuple[str, str, str], Any]:
        """The values undos put back for one person: {(server, item id, field): value}."""
        rows = self._rows(
            "SELECT server, item_id, field, value FROM undone WHERE user_key=?", (user_key,)
        )
        return {(srv, iid, fld): json.loads(value) for srv, iid, fld, value in rows}

    def forget_undone(self, rows: list[tuple[str, str, str, str]]) -> None:
        """(server, user, item, field) rows: the servers agree again, or the person changed it."""
        with self._tx() as c:
            c.executemany(
                "DELETE FROM undone WHERE server=? AND user_key=? AND item_id=? AND field=?", rows
            )

    def keep_apart(self, rows: list[tuple[str, str, str, str, Any]], cause: str) -> None:
        """(server, user, item, field, value) rows the servers hold differently on purpose (as
        an undo leaves them): a pass leaves the field alone until the person changes it."""
        with self._tx() as c:
            c.executemany(
                "INSERT OR REPLACE INTO undone VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(s, u, i, f, json.dumps(v), cause, utcnow()) for s, u, i, f, v in rows],
            )

    def remember_states(self, rows: list[tuple[str, str, str, str, Any, float | None]]) -> None:
        """Many (server, user, item, field, value, observed at or None = keep) in one
        transaction."""
        with self._tx() as c:
            self._write_states(c, rows)

    @staticmethod
    def _write_states(
        c: sqlite3.Connection, rows: list[tuple[str, str, str, str, Any, float | None]]
    ) -> None:
        moved = [(s, u, i, f, json.dumps(v), at) for s, u, i, f, v, at in rows if at is not None]
        kept = [(s, u, i, f, json.dumps(v)) for s, u, i, f, v, at in rows if at is None]
        if moved:
            c.executemany("INSERT OR REPLACE INTO state VALUES (?, ?, ?, ?, ?, ?)", moved)
        if kept:  # a read says nothing about when: the value changes, its time stays
            c.executemany(
                "INSERT INTO state VALUES (?, ?, ?, ?, ?, 0.0) "
                "ON CONFLICT (server, user_key, item_id, field) DO UPDATE SET value = "
                "excluded.value",
                kept,
            )

    @staticmethod
    def state_rows(
        server: str, user_key: str, item_id: str, values: dict[str, Any], observed: dict[str, float]
    ) -> list[tuple[str, str, str, str, Any, float | None]]:
        """remember_states rows for one item: only fields in ``observed`` move their time."""
        return [
            (server, user_key, item_id, fld, value, observed.get(fld))
            for fld, value in values.items()
        ]

    def prepare_write(
        self, server: str, user_key: str, item_id: str, expected: dict, observed: dict
    ) -> None:
        """Before a write: record the state it will create, and expect its echo (one commit)."""
        with self._tx() as c:
            self._write_states(c, self.state_rows(server, user_key, item_id, expected, observed))
            c.execute(
                "INSERT INTO expected_echo (server, user_key, item_id, snapshot, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (server, user_key, item_id, json.dumps(expected), utcnow()),
            )

    # items
    def upsert_items(self, rows: list[ItemInfo]) -> None:
        with self._tx() as c:
            c.executemany(
                "INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [tuple(r.__dict__.values()) for r in rows],  # astuple() deep-copies: slow
            )

    def delete_item(self, server: str, item_id: str) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM items WHERE server=? AND item_id=?", (server, item_id))

    def get_item(self, server: str, item_id: str) -> ItemInfo | None:
        rows = self._rows("SELECT * FROM items WHERE server=? AND item_id=?", (server, item_id))
        return ItemInfo(*rows[0]) if rows else None

    def search_items(self, text: str, limit: int = 10) -> list[ItemInfo]:
        """Items whose name contains ``text`` (any case), on any server: the inspector's search."""
        pattern = "%" + text.replace("%", "").replace("_", "") + "%"
        rows = self._rows(
            "SELECT * FROM items WHERE name LIKE ? ORDER BY name, server LIMIT ?", (pattern, limit)
        )
        return [ItemInfo(*r) for r in rows]

    def find_items(self, server: str, column: str, value: Any) -> list[ItemInfo]:
        index = {
            "path_key": "items_path",
            "imdb": "items_imdb",
            "tmdb": "items_tmdb",
            "tvdb": "items_tvdb",
        }[column]
        # INDEXED BY: without ANALYZE statistics SQLite prefers the primary key's "server" prefix
        # and scans a whole library per lookup (measured: 0.5 ms at 2,000 items, linear beyond).
        rows = self._rows(
            f"SELECT * FROM items INDEXED BY {index} WHERE server=? AND {column}=?", (server, value)
        )
        return [ItemInfo(*r) for r in rows]

    def find_episode(
        self, server: str, series_id: str, season: int, episode: int
    ) -> list[ItemInfo]:
        rows = self._rows(
            "SELECT * FROM items INDEXED BY items_episode WHERE server=? AND series_id=? AND "
            "season=? AND episode=?",
            (server, series_id, season, episode),
        )
        return [ItemInfo(*r) for r in rows]

    def find_season(self, server: str, series_id: str, number: int) -> list[ItemInfo]:
        """A show's season by its number (a Season's IndexNumber, kept in the episode column)."""
        rows = self._rows(
            "SELECT * FROM items INDEXED BY items_episode WHERE server=? AND series_id=? AND "
            "season IS NULL"
            " AND episode=? AND type='Season'",
            (server, series_id, number),
        )
        return [ItemInfo(*r) for r in rows]

    def find_named(self, server: str, type_: str, name: str, year: int | None) -> list[ItemInfo]:
        """Items of one type whose name is ``name`` in any case, of that year (or of none)."""
        rows = self._rows(
            "SELECT * FROM items WHERE server=? AND type=? AND name=? COLLATE NOCASE AND year IS ?",
            (server, type_, name, year),
        )
        return [ItemInfo(*r) for r in rows]

    def path_matches(self, server: str, path_keys: list[str]) -> dict[str, list[str]]:
        """{path key: ids of the items with it on ``server``} for a page of path keys (at most a
        few hundred): one query where Library.lookup makes one per item."""
        out: dict[str, list[str]] = {}
        for path_key, item_id in self._rows(
            "SELECT path_key, item_id FROM items INDEXED BY items_path WHERE server=? AND "
            f"path_key IN {IN_LIST}",
            (server, json.dumps(path_keys)),
        ):
            out.setdefault(path_key, []).append(item_id)
        return out

    # A reconciliation pass's reading of one person: each server's lists (played, favourite,
    # liked, resumable), kept in a table of this thread's connection instead of dictionaries of
    # every item (issue 25: 100,000 items held 148 MB). TEMP: SQLite keeps it out of the
    # database file (a temporary file of its own, spilled from a small cache), so it needs no
    # write lock shared with webhooks and leaves nothing to back up. One row per item and server;
    # ``full`` is the UserData where a list carried it (the resumable one), else NULL and the
    # flags say which lists the item is in; ``grouped``: matched into a group already.
    _PASS_SEEN = (
        "CREATE TEMP TABLE IF NOT EXISTS pass_seen (server TEXT NOT NULL, item_id TEXT NOT NULL,"
        " played INTEGER NOT NULL, favorite INTEGER NOT NULL, likes INTEGER NOT NULL, full TEXT,"
        " grouped INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (server, item_id)) WITHOUT ROWID"
    )

    def pass_seen_clear(self) -> None:
        conn = self._conn()
        conn.execute(self._PASS_SEEN)
        conn.execute("DELETE FROM temp.pass_seen")

    def pass_seen_drop(self) -> None:
        """The end of a pass: its lists dropped, and the memory SQLite kept for them handed back
        (the TEMP table's own page cache, up to 2 MB, stays allocated otherwise; at 20,000 items
        that was 4 MB of the service's memory at rest)."""
        conn = self._conn()
        conn.execute("DROP TABLE IF EXISTS temp.pass_seen")
        conn.execute("PRAGMA shrink_memory")

    @contextmanager
    def _temp_tx(self) -> Iterator[sqlite3.Connection]:
        """A transaction that writes only TEMP tables: no lock on the file, no _write_lock."""
        with self._transaction(self._conn(), "BEGIN") as conn:
            yield conn

    def pass_seen_add(
        self, server: str, rows: list[tuple[str, bool, bool, bool, dict | None]]
    ) -> None:
        """(item id, played, favourite, liked, UserData or None) rows from one page of a list: the
        flags add to what earlier lists said of the item, and a UserData replaces them."""
        with self._temp_tx() as conn:
            conn.executemany(
                "INSERT INTO temp.pass_seen (server, item_id, played, favorite, likes, full)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (server, item_id) DO UPDATE SET"
                " played = max(played, excluded.played), favorite = max(favorite, "
                "excluded.favorite),"
                " likes = max(likes, excluded.likes), full = coalesce(excluded.full, full)",
                [
                    (server, i, p, f, lk, None if ud is None else json.dumps(ud))
                    for i, p, f, lk, ud in rows
                ],
            )

    def pass_seen_unindexed(self, server: str) -> list[str]:
        """Ids in the person's lists on ``server`` that its item index does not hold yet."""
        rows = self._rows(
            "SELECT item_id FROM temp.pass_seen s WHERE server=? AND NOT EXISTS"
            " (SELECT 1 FROM items i WHERE i.server = s.server AND i.item_id = s.item_id)",
            (server,),
        )
        return [r[0] for r in rows]

    def pass_seen_page(self, server: str, after: str, limit: int) -> list[tuple[ItemInfo, dict]]:
        """The next ``limit`` items of ``server``'s lists not grouped yet, in id order from
        ``after``, with their index row (items the index lacks are left out) and UserData."""
        rows = self._rows(
            "SELECT s.played, s.favorite, s.likes, s.full, i.* FROM temp.pass_seen s"
            " JOIN items i ON i.server = s.server AND i.item_id = s.item_id"
            " WHERE s.server=? AND s.grouped=0 AND s.item_id > ? ORDER BY s.item_id LIMIT ?",
            (server, after, limit),
        )
        return [(ItemInfo(*r[4:]), _pass_user_data(*r[:4])) for r in rows]

    def pass_seen_of(self, server: str, item_ids: list[str]) -> dict[str, dict]:
        """{item id: UserData} of those of ``item_ids`` in the person's lists on ``server``."""
        if not item_ids:
            return {}
        rows = self._rows(
            "SELECT item_id, played, favorite, likes, full FROM temp.pass_seen"
            f" WHERE server=? AND item_id IN {IN_LIST}",
            (server, json.dumps(item_ids)),
        )
        return {r[0]: _pass_user_data(*r[1:]) for r in rows}

    def pass_seen_grouped(self, members: list[tuple[str, str]]) -> None:
        """(server, item id) members of groups made: their own turn is not to come."""
        with self._temp_tx() as conn:
            conn.executemany(
                "UPDATE temp.pass_seen SET grouped=1 WHERE server=? AND item_id=?", members
            )

    def count_items(self) -> dict[str, int]:
        return {
            r[0]: r[1] for r in self._rows("SELECT server, count(*) FROM items GROUP BY server")
        }

    # users
    def replace_users(self, server: str, users: list[tuple[str, str, bool]]) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM users WHERE server=?", (server,))
            c.executemany(
                "INSERT INTO users VALUES (?, ?, ?, ?, ?)",
                [(server, uid, name, name_key(name), int(admin)) for uid, name, admin in users],
            )

    _USER = "SELECT server, user_id, name, is_admin FROM users"

    def find_users(self, server: str, key: str) -> list[UserRow]:
        return [
            UserRow(*r)
            for r in self._rows(f"{self._USER} WHERE server=? AND name_key=?", (server, key))
        ]

    def rename_user(self, server: str, user_id: str, name: str) -> None:
        with self._tx() as c:
            c.execute(
                "UPDATE users SET name=?, name_key=? WHERE server=? AND user_id=?",
                (name, name_key(name), server, user_id),
            )

    def user_by_id(self, server: str, user_id: str) -> UserRow | None:
        rows = self._rows(f"{self._USER} WHERE server=? AND user_id=?", (server, user_id))
        return UserRow(*rows[0]) if rows else None

    def all_users(self) -> list[UserRow]:
        return [UserRow(*r) for r in self._rows(f"{self._USER} ORDER BY name_key, server")]

    # generated passwords
    def add_password(self, server: str, username: str, password: str) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO passwords (server, username, password, created_at) VALUES (?, ?, ?, "
                "?)",
                (server, username, password, utcnow()),
            )

    def passwords(self) -> list[Password]:
        return [
            Password(*r)
            for r in self._rows(
                "SELECT id, server, username, password, created_at FROM passwords ORDER BY id"
            )
        ]

    def count_passwords(self) -> int:
        return self._rows("SELECT count(*) FROM passwords")[0][0]

    def ack_password(self, password_id: int) -> bool:
        """The operator has passed the password on: erase it — from the file too. secure_delete
        zeroes the freed row; the checkpoint then copies that page over the database file and
        empties the WAL, which still held the page as it was when the password was written."""
        with self._tx() as c:
            gone = c.execute("DELETE FROM passwords WHERE id=?", (password_id,)).rowcount == 1
        if gone and self.journal_mode == "WAL":
            with self._write_lock:
                self._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return gone

    # meta
    def get_meta(self, key: str) -> str | None:
        rows = self._rows("SELECT value FROM meta WHERE key=?", (key,))
        return rows[0][0] if rows else None

    def migration(self) -> dict | None:
        """What was carried over from the older program's file, if it was (OlderDatabase).
        Older program: /api/status's "migration", the dashboard's "Carried over" line."""
        raw = self.get_meta("migrated_from_older")
        return json.loads(raw) if raw else None

    def next_number(self, name: str) -> int:
        """The next number of a series (passes, undos, imports), for causes in the journal."""
        with self._tx() as c:
            row = c.execute("SELECT value FROM meta WHERE key=?", (f"counter:{name}",)).fetchone()
            n = int(row[0]) + 1 if row else 1
            c.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                (f"counter:{name}", str(n)),
            )
            return n

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # dashboard sign-ins
    def sessions(self, now: float) -> dict[str, float]:
        """Sign-ins still valid: cookie hash → expiry."""
        return dict(
            self._rows("SELECT token_hash, expires_at FROM sessions WHERE expires_at > ?", (now,))
        )

    def add_session(self, token_hash: str, expires_at: float, now: float) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))
            c.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?)", (token_hash, expires_at))

    def drop_session(self, token_hash: str) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM sessions WHERE token_hash = ?", (token_hash,))

    # sync log and stats
    def sync_log(
        self, limit: int = 50, offset: int = 0, **filters: Any
    ) -> tuple[list[LogEntry], int]:
        """The log, newest first, filtered (username and item_name: a part, any case)."""
        where, args = [], []
        for col in ("username", "item_name"):
            if filters.get(col):  # what a person types
                where.append(f"l.{col} LIKE ?")
                args.append("%" + filters[col].replace("%", "").replace("_", "") + "%")
        if filters.get("result") == "changes":  # what a person means by "what happened"
            where.append(f"l.result IN ({','.join('?' * len(CHANGE_RESULTS))})")
            args += CHANGE_RESULTS
            filters = {**filters, "result": None}
        for col in ("source", "target", "result", "field"):
            if filters.get(col):
                where.append(f"l.{col} = ?")
                args.append(filters[col])
        if filters.get("success") is not None:
            where.append(
                ("" if filters["success"] else "NOT ")
                + "l.result IN ('ok', 'noop', 'stale', 'dry_run')"
            )
        if filters.get("server"):
            where.append("(l.source = ? OR l.target = ?)")
            args += [filters["server"], filters["server"]]
        if filters.get("since"):
            where.append("l.at >= ?")
            args.append(filters["since"])
        if filters.get("until"):
            where.append("l.at <= ?")
            args.append(filters["until"])
        if filters.get("cause"):
            where.append("l.cause = ?")
            args.append(filters["cause"])
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        total = self._rows(f"SELECT count(*) FROM sync_log l {clause}", tuple(args))[0][0]
        rows = self._rows(
            f"SELECT {_LOG_COLUMNS}, j.source_item_id FROM sync_log l LEFT JOIN jobs j ON j.id = "
            "l.job_id "
            f"{clause} ORDER BY l.id DESC LIMIT ? OFFSET ?",
            (*args, limit, offset),
        )
        return [_log_entry(r) for r in rows], total

    # the brake's held changes
    def brake_released(self, source: str, user_key: str) -> float:
        """When held changes from ``source`` for this person were last applied (the brake counts
        afresh from then), or 0."""
        raw = self.get_meta(f"brake_released:{source}:{user_key}")
        return float(raw) if raw else 0.0

    def held_counts(self) -> list[tuple]:
        """Held changes per source, person, field and value: (source, user_key, username, field,
        value JSON, items, jobs, first and last arrival, targets comma-separated)."""
        return [
            tuple(r)
            for r in self._rows(
                "SELECT source, user_key, min(username), field, value, count(DISTINCT "
                "source_item_id), count(*),"
                " min(created_at), max(created_at), group_concat(DISTINCT target) FROM jobs WHERE "
                "status='held'"
                " GROUP BY source, user_key, field, value ORDER BY source, user_key"
            )
        ]

    def held_sample(self, source: str, user_key: str, limit: int) -> list[tuple[str, str, str]]:
        """A few held changes of one group: (field, value JSON, item name), oldest first."""
        return [
            tuple(r)
            for r in self._rows(
                "SELECT field, value, item_name FROM jobs WHERE status='held' AND source=? AND "
                "user_key=? "
                "GROUP BY source_item_id, field ORDER BY min(id) LIMIT ?",
                (source, user_key, limit),
            )
        ]

    def count_held(self) -> int:
        return self._rows("SELECT count(*) FROM jobs WHERE status='held'")[0][0]

    def release_held(self, source: str, user_key: str) -> int:
        """Apply: the held changes go (due now), and the brake counts afresh for this person."""
        now = utcnow()
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                (f"brake_released:{source}:{user_key}", now),
            )
            return c.execute(
                "UPDATE jobs SET status='pending', due_at=?, updated_at=? "
                "WHERE status='held' AND source=? AND user_key=?",
                (now, now, source, user_key),
            ).rowcount

    def discard_held(self, source: str, user_key: str) -> list[Job]:
        """Discard: the held changes are dropped (kept as 'discarded' until retention). Returns
        them."""
        with self._tx() as c:
            rows = c.execute(
                "SELECT * FROM jobs WHERE status='held' AND source=? AND user_key=?",
                (source, user_key),
            ).fetchall()
            c.execute(
                "UPDATE jobs SET status='discarded', last_error='discarded (brake)', updated_at=? "
                "WHERE status='held' AND source=? AND user_key=?",
                (utcnow(), source, user_key),
            )
            c.execute(
                "DELETE FROM meta WHERE key=?", (f"brake_held:{source}:{user_key}",)
            )  # a new burst warns anew
        return [self._job(r) for r in rows]

    def journal(self, scope: dict, limit: int = JOURNAL_SCOPE_LIMIT) -> list[LogEntry]:
        """The writes (result ok, with values before and after) in a scope, oldest first:
        ``id`` one entry; ``cause`` what one event or pass caused; ``user`` (person), ``server``
        (where written), ``source`` (where from), ``since`` and ``until`` (epoch seconds)."""
        where, args = ["l.result = 'ok'", "l.before IS NOT NULL"], []
        for key, sql in (
            ("id", "l.id = ?"),
            ("cause", "l.cause = ?"),
            ("user", "l.user_key = ?"),
            ("server", "l.target = ?"),
            ("source", "l.source = ?"),
            ("since", "l.at >= ?"),
            ("until", "l.at <= ?"),
        ):
            if scope.get(key) not in (None, ""):
                where.append(sql)
                args.append(scope[key])
        rows = self._rows(
            f"SELECT {_LOG_COLUMNS}, j.source_item_id FROM sync_log l LEFT JOIN jobs j ON j.id = "
            "l.job_id "
            f"WHERE {' AND '.join(where)} ORDER BY l.id LIMIT ?",
            (*args, limit),
        )
        return [_log_entry(r) for r in rows]

    def log_write(self, **entry: Any) -> None:
        """A journal line for a write made outside the job queue (a pass's playlist changes)."""
        with self._tx() as c:
            c.execute(
                "INSERT INTO sync_log (at, source, target, username, item_name, field, old, new, "
                "result, user_key,"
                " cause) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'ok', ?, ?)",
                (
                    utcnow(),
                    entry["source"],
                    entry["target"],
                    entry["username"],
                    entry["item_name"],
                    entry["field"],
                    entry["old"],
                    entry["new"],
                    entry["user_key"],
                    entry["cause"],
                ),
            )

    def count_log(self) -> int:
        return self._rows("SELECT count(*) FROM sync_log")[0][0]

    def sync_stats(self) -> dict[str, Any]:
        rows = self._rows("SELECT result, count(*), max(at) FROM sync_log GROUP BY result")
        by = {r[0]: r[1] for r in rows}
        last = max((r[2] for r in rows), default=None)
        return {"by_result": by, "last_sync_at": last}

    def check_writable(self, timeout: float = 0.5) -> None:
        """Raise StoreBusy unless a write can start within ``timeout`` seconds.

        For /readyz: bounded, so probes cannot pile up behind a locked file and hold the request
        threads that webhooks need. It takes the write lock SQLite would, and writes nothing.
        """
        if not self._write_lock.acquire(timeout=timeout):
            raise sqlite3.OperationalError(BUSY_MESSAGE)
        conn = self._conn()
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            conn.execute("BEGIN IMMEDIATE")
            if not self.intake_error:
                conn.execute("ROLLBACK")
                return
            # The last webhook could not be stored (a full disk, say): only a committed write
            # that needs room like a webhook's row says whether one can be stored again. Its
            # row is deleted in the same transaction: nothing of it stays.
            try:
                cur = conn.execute(
                    "INSERT INTO inbox (server, event, received_at, body, planned) VALUES ('', "
                    "'probe', 0, ?, 2)",
                    ("x" * 4096,),
                )
                conn.execute("DELETE FROM inbox WHERE id = ?", (cur.lastrowid,))
                conn.execute("COMMIT")
            except sqlite3.Error as e:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise StoreError(f"webhooks cannot be stored: {e}") from None
            self.intake_error = None
        finally:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._write_lock.release()

    def oldest_unplanned_age(self) -> float:
        """Seconds since the oldest webhook still waiting for the planner arrived (0: none)."""
        row = self._rows("SELECT min(received_at) FROM inbox WHERE planned = 0")[0][0]
        return 0.0 if row is None else max(0.0, utcnow() - row)


# ── JellyfinClient ───────────────────────────────────────────────────────────


@dataclass(frozen=True)
class ServerVersion:
    raw: str
    major: int
    minor: int

    def before(self, major: int, minor: int) -> bool:
        return (self.major, self.minor) < (major, minor)

    @property
    def legacy(self) -> bool:
        """10.8 and older: legacy /Users/{u}/… routes, no /UserData writes (docs/jellyfin.md §2)."""
        return self.before(10, 9)

    @property
    def sets_positions(self) -> bool:
        """A resume position can be written with an API key (/UserData, 10.9+; docs/jellyfin.md
        §2)."""
        return not self.legacy

    @property
    def writes_user_settings(self) -> bool:
        """A person's UserConfiguration can be written with an API key: 10.9+ (POST
        /Users/Configuration?userId=). On 10.8 UserController.UpdateUserConfiguration calls
        RequestHelpers.AssertCanUpdateUser, which dereferences auth.User — null for an API key —
        and answers 500 (jellyfin#8287, fixed in 10.9; read at v10.8.13)."""
        return not self.legacy

    @property
    def removes_playlist_entries(self) -> bool:
        """DELETE /Playlists/{id}/Items accepts an API key from 10.11 on (docs/jellyfin.md §2)."""
        return not self.before(10, 11)

    @property
    def writes_stream_choices(self) -> bool:
        """Can a user's audio and subtitle track choice be written with an API key? On no version:
        UpdateUserItemDataDto has no stream fields (UserDataManager.SaveUserData copies the
        others), and only the user's own playback reports set them
        (SessionManager.UpdatePlaybackSettings, for a session that has that user; an API key's
        has none) — read in 10.9.11 … 12.0-rc5. So sync.audio_stream and sync.subtitle_stream
        are reported as a limit of every server rather than guessed at."""
        return False

    def limits(self, sync: SyncConfig) -> list[str]:
        """What this version cannot do with an API key of what ``sync`` asks, in words for the
        dashboard."""
        out = []
        # Older program: its sync.audio_stream and sync.subtitle_stream
        if (sync.audio_stream or sync.subtitle_stream) and not self.writes_stream_choices:
            out.append(
                "Audio and subtitle track choices (sync.audio_stream, sync.subtitle_stream, "
                "switched on) "
                "cannot be written with an API key on any Jellyfin version: not synced. Played, "
                "positions, favourites and likes are; turn these two off to hide this line"
            )
        if self.legacy:
            out.append(
                "Jellyfin 10.8: resume positions cannot be set with an API key; "
                "marking played also adds one to the play count"
            )
            out.append("Jellyfin 10.8: users cannot be renamed with an API key (rename by hand)")
            if sync.preferences:
                out.append(
                    "Jellyfin 10.8: language and playback preferences cannot be written with an "
                    "API "
                    "key: they are read here and carried to the others, never written here"
                )
            out.append(
                "Jellyfin 10.8: playlist owners cannot be told with an API key: every playlist a "
                "user "
                "sees counts as theirs"
            )
        if not self.removes_playlist_entries:
            out.append("Before 10.11: playlist entries cannot be removed with an API key")
        return out

    @property
    def playlist_owner_rule(self) -> str:
        """How this version tells who owns a playlist, for an API key (no GET /Playlists/{id}:
        from 10.10 on PlaylistsController.GetPlaylist takes the caller's user id, empty for an
        API key, and answers 400 — jellyfin/jellyfin#13476, #15600).

        "none": 10.8 has no ownership rule it exposes (every playlist a user sees counts).
        "list": 10.9–10.11: ``CanDelete`` in the user's playlist list is Playlist.CanDelete —
        administrator or owner.
        "item": 12.0 answers lists through BaseItem.CanDelete(user, folders) (true for whoever
        sees it; DtoService), so only a single ``GET /Items/{id}?userId=`` applies the rule.
        """
        if self.legacy:
            return "none"
        return "list" if self.before(12, 0) else "item"

    @classmethod
    def parse(cls, raw: str) -> ServerVersion:
        m = re.match(r"^(\d+)\.(\d+)", raw or "")
        if not m:
            return cls(raw or "?", 10, 10)
        return cls(raw, int(m.group(1)), int(m.group(2)))


class JellyfinClient:
    """HTTP to one Jellyfin server, with routes chosen by its version. Knows nothing of queues.

    Connections are persistent and per thread (http.client is not thread-safe). The API key
    travels only in the Authorization header built here, and no message we raise contains it.
    """

    def __init__(self, server: ServerConfig, timeout: float = 10.0):
        self.server = server
        self.name = server.name
        self.timeout = timeout
        self.version: ServerVersion | None = None
        self.server_id: str | None = None
        parts = urllib.parse.urlsplit(server.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port
        self._base = parts.path.rstrip("/")
        device = f"jellyfin-db-sync-{server.name}"
        self._auth = (
            f'MediaBrowser Client="jellyfin-db-sync", Device="jellyfin-db-sync", '
            f'DeviceId="{device}", Version="{__version__}", Token="{server.api_key}"'
        )
        self._local = threading.local()
        self.requests = 0  # counted for /metrics and the benchmark
        self.last_latency = 0.0

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def request(self, method: str, path: str, query: dict | None = None, body: Any = None) -> Any:
        """One request; JSON in and out. Raises JellyfinError with method, path and status only."""
        url = self._base + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Authorization": self._auth, "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        what = f"{self.name}: {method} {path}"
        for attempt in (1, 2):  # a second try only for a keep-alive connection the server closed
            started = time.monotonic()
            try:
                conn = self._connection()
                conn.request(method, url, body=data, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self._drop_connection()
                if attempt == 1:
                    continue
                raise JellyfinError(f"{what}: connection lost ({type(e).__name__})") from None
            except (OSError, http.client.HTTPException) as e:
                self._drop_connection()
                reason = getattr(e, "strerror", None) or type(e).__name__
                raise JellyfinError(f"{what}: cannot connect ({reason})") from None
            finally:
                self.requests += 1
                self._local.requests = getattr(self._local, "requests", 0) + 1
                self.last_latency = time.monotonic() - started
            break
        self._local.read = getattr(self._local, "read", 0) + len(payload)
        log.debug("%s → %s (%d bytes)", what, resp.status, len(payload))
        if resp.status >= 400:
            # Jellyfin's error bodies say only "Error processing request.": branch on the status.
            raise JellyfinError(
                f"{what}: HTTP {resp.status}", resp.status, retryable=resp.status >= 500
            )
        if not payload:
            return None
        try:
            return json.loads(payload)
        except ValueError:
            return payload.decode("utf-8", "replace")

    # server
    def info(self) -> dict:
        info = self.request("GET", "/System/Info/Public")
        if not isinstance(info, dict) or "Version" not in info:
            raise JellyfinError(
                f"{self.name}: /System/Info/Public did not answer like Jellyfin", 0, False
            )
        self.version = ServerVersion.parse(str(info.get("Version")))
        self.server_id = info.get("Id")
        return info

    def thread_counts(self) -> tuple[int, int]:
        """(requests, response bytes) this thread has made to this server: what one of its
        tasks cost (self.requests counts every thread's)."""
        return getattr(self._local, "requests", 0), getattr(self._local, "read", 0)

    def forget_version(self) -> None:
        self.version = None

    def ensure_version(self) -> ServerVersion:
        if self.version is None:
            self.info()
        assert self.version is not None
        return self.version

    # the Webhook plugin's own configuration (PluginsController: GET/POST
    # /Plugins/{id}/Configuration)
    def webhook_plugin_config(self) -> dict:
        """The Webhook plugin's whole configuration; JellyfinError 404 if it is not installed."""
        return self.request("GET", f"/Plugins/{WEBHOOK_PLUGIN_ID}/Configuration") or {}

    def save_webhook_plugin_config(self, config: dict) -> None:
        """The POST replaces the whole configuration: send back everything read, changed only
        where we mean to."""
        self.request("POST", f"/Plugins/{WEBHOOK_PLUGIN_ID}/Configuration", body=config)

    # users
    def users(self) -> list[dict]:
        return self.request("GET", "/Users") or []

    def create_user(self, name: str, password: str | None) -> dict:
        # "" means no password; a non-empty one is set at creation (works on 10.8 too, where
        # changing a password later needs an admin's user token).
        return (
            self.request("POST", "/Users/New", body={"Name": name, "Password": password or ""})
            or {}
        )

    def delete_user(self, user_id: str) -> None:
        self.request("DELETE", f"/Users/{user_id}")

    def get_user(self, user_id: str) -> dict:
        return self.request("GET", f"/Users/{user_id}") or {}

    def user_configuration(self, user_id: str) -> dict:
        """The person's UserConfiguration (GET /Users/{id} → Configuration, every version)."""
        return dict(self.get_user(user_id).get("Configuration") or {})

    def save_user_configuration(self, user_id: str, configuration: dict) -> None:
        """The POST replaces the whole object (UserManager.UpdateConfigurationAsync: a field
        left out falls back to its default): send back everything read, changed only where we
        mean to. 10.9+: POST /Users/Configuration?userId= (UserController.UpdateUserConfiguration);
        10.8 has only POST /Users/{id}/Configuration, which answers 500 to an API key."""
        if not self.ensure_version().writes_user_settings:
            raise SyncError("Jellyfin 10.8 cannot change a person's settings with an API key")
        self.request("POST", "/Users/Configuration", {"userId": user_id}, configuration)

    def rename_user(self, user_id: str, new_name: str) -> None:
        if self.ensure_version().legacy:
            raise SyncError("Jellyfin 10.8 cannot rename a user with an API key; rename it by hand")
        dto = self.get_user(user_id)  # the update takes the whole UserDto (docs/jellyfin.md §2.6)
        dto["Name"] = new_name
        self.request("POST", "/Users", {"userId": user_id}, dto)

    def disable_user(self, user_dto: dict) -> None:
        policy = dict(
            user_dto.get("Policy") or {}
        )  # a full replacement: start from the current one
        policy["IsDisabled"] = True
        self.request("POST", f"/Users/{user_dto['Id']}/Policy", body=policy)

    # items
    def items_page(self, start: int, limit: int, min_saved: str | None = None) -> list[dict]:
        # No userId: with one, alternate versions collapse and their paths vanish (docs/jellyfin.md
        # §2).
        res = self.request(
            "GET",
            "/Items",
            {
                "recursive": "true",
                "includeItemTypes": INDEX_ITEM_TYPES,
                "fields": "Path,ProviderIds",
                "enableImages": "false",
                "enableUserData": "false",
                "enableTotalRecordCount": "false",
                "isMissing": "false",
                "minDateLastSavedForUser": min_saved,
                "startIndex": start,
                "limit": limit,
            },
        )
        return (res or {}).get("Items", [])

    def user_items(
        self,
        user_id: str,
        query: dict,
        user_data: bool = True,
        page: int = LIST_PAGE_SIZE,
        types: str = LEAF_ITEM_TYPES,
    ) -> Iterator[dict]:
        """A user's items matching a filter (isPlayed, isFavorite, filters=…), page by page
        (docs/jellyfin.md §2: filtered /Items queries, not one request per item): Id and name, with
        UserData if asked. No paths: the item index has them (items_by_ids for a new one)."""
        path = f"/Users/{user_id}/Items" if self.ensure_version().legacy else "/Items"
        base = {
            "recursive": "true",
            "includeItemTypes": types,
            "enableImages": "false",
            "enableTotalRecordCount": "false",
            "enableUserData": "true" if user_data else "false",
            **query,
        }
        if not self.ensure_version().legacy:
            base["userId"] = user_id
        start = 0
        while True:
            items = (
                self.request("GET", path, {**base, "startIndex": start, "limit": page}) or {}
            ).get("Items", [])
            yield from items
            if len(items) < page:
                return
            start += len(items)

    def user_lists(self, user_id: str, full: bool = False, dislikes: bool = False) -> Iterator:
        """(flag, item) for each item (and folder: show, album, artist …) of a user's played,
        favourite, liked (and, if asked, disliked) and resume lists: together, every item whose
        user data is not blank. ``flag`` is the UserData flag being in that list means ("Played",
        "IsFavorite", "Likes"; None for the resume list, read last and always with UserData, so
        its positions replace what the others said); the other lists carry UserData only if
        ``full``."""
        items, artists = self.user_items, self.user_artists
        # hearts and ratings: on items and on shows, albums… alike (issue 26)
        rated = functools.partial(self.user_items, types=RATED_ITEM_TYPES)
        lists: list[tuple[Any, dict, str | None]] = [
            (items, {"isPlayed": "true"}, "Played"),
            (rated, {"isFavorite": "true"}, "IsFavorite"),
            (artists, {"isFavorite": "true"}, "IsFavorite"),
            (rated, {"filters": "Likes"}, "Likes"),
            (artists, {"filters": "Likes"}, "Likes"),
        ]
        if dislikes:  # Likes: false
            lists += [
                (rated, {"filters": "Dislikes"}, "Likes"),
                (artists, {"filters": "Dislikes"}, "Likes"),
            ]
        lists.append((items, {"filters": "IsResumable"}, None))
        for reader, query, flag in lists:
            for dto in reader(user_id, query, user_data=full or flag is None):
                if dto.get("Id"):
                    yield flag, dto

    def user_artists(self, user_id: str, query: dict, user_data: bool = True) -> Iterator[dict]:
        """A user's artists matching a filter (isFavorite, filters=Likes/Dislikes), from /Artists,
        which takes userId on every version (USER_FOLDER_TYPES says why /Items cannot)."""
        base = {
            "userId": user_id,
            "enableImages": "false",
            "enableTotalRecordCount": "false",
            "enableUserData": "true" if user_data else "false",
            **query,
        }
        start = 0
        while True:
            page = {**base, "startIndex": start, "limit": INDEX_PAGE_SIZE}
            items = (self.request("GET", "/Artists", page) or {}).get("Items", [])
            for dto in items:
                yield {**dto, "Type": dto.get("Type") or "MusicArtist"}
            if len(items) < INDEX_PAGE_SIZE:
                return
            start += len(items)

    def recently_played(self, user_id: str, start: int, limit: int) -> list[dict]:
        """One page of the user's items, the most recently played first, with UserData
        (ItemsController.GetItems: sortBy=DatePlayed orders by the user's LastPlayedDate; items
        never played have none and come last). No IsPlayed filter: PlaybackStart sets
        LastPlayedDate, so the page holds what was played to the end and what was stopped half
        way alike — one request where the played list and the resume list would take two."""
        legacy = self.ensure_version().legacy
        query = {
            "recursive": "true",
            "includeItemTypes": LEAF_ITEM_TYPES,
            "sortBy": "DatePlayed",
            "sortOrder": "Descending",
            "enableUserData": "true",
            "enableImages": "false",
            "enableTotalRecordCount": "false",
            "startIndex": start,
            "limit": limit,
            **({} if legacy else {"userId": user_id}),
        }
        path = f"/Users/{user_id}/Items" if legacy else "/Items"
        return (self.request("GET", path, query) or {}).get("Items", [])

    def playlists(self, user_id: str) -> list[dict]:
        """The playlists a user sees, each with ``CanDelete`` as this server's Playlist rule gives
        it for them (administrator or owner; see ServerVersion.playlist_owner_rule), or without
        it on 10.8, which cannot tell."""
        version = self.ensure_version()
        path = f"/Users/{user_id}/Items" if version.legacy else "/Items"
        query = {
            "includeItemTypes": "Playlist",
            "recursive": "true",
            "enableImages": "false",
            **({} if version.legacy else {"userId": user_id, "fields": "CanDelete"}),
        }
        found = (self.request("GET", path, query) or {}).get("Items", [])
        if version.playlist_owner_rule == "item":
            for p in found:
                dto = (
                    self.request(
                        "GET", f"/Items/{p['Id']}", {"userId": user_id, "fields": "CanDelete"}
                    )
                    or {}
                )
                p["CanDelete"] = bool(dto.get("CanDelete"))
        if version.playlist_owner_rule == "none":
            for p in found:
                p.pop("CanDelete", None)
        return found

    def playlist_items(self, playlist_id: str, user_id: str) -> list[dict]:
        query = {"userId": user_id, "fields": "Path,ProviderIds", "enableImages": "false"}
        return (self.request("GET", f"/Playlists/{playlist_id}/Items", query) or {}).get(
            "Items", []
        )

    def create_playlist(self, name: str, user_id: str, ids: list[str]) -> str:
        body: dict[str, Any] = {"Name": name, "Ids": ids, "UserId": user_id}
        if self.ensure_version().legacy:
            body["MediaType"] = "Video"
        else:
            body["IsPublic"] = False  # 10.9+ makes new playlists public unless told otherwise
        return normalise_id((self.request("POST", "/Playlists", body=body) or {}).get("Id", ""))

    def add_to_playlist(self, playlist_id: str, user_id: str, ids: list[str]) -> None:
        self.request(
            "POST", f"/Playlists/{playlist_id}/Items", {"ids": ",".join(ids), "userId": user_id}
        )

    def remove_from_playlist(self, playlist_id: str, entry_ids: list[str]) -> None:
        if not self.ensure_version().removes_playlist_entries:
            raise SyncError("Jellyfin before 10.11 cannot remove playlist entries with an API key")
        self.request("DELETE", f"/Playlists/{playlist_id}/Items", {"entryIds": ",".join(entry_ids)})

    def items_by_ids(self, ids: list[str]) -> list[dict]:
        res = self.request(
            "GET",
            "/Items",
            {
                "ids": ",".join(ids),
                "fields": "Path,ProviderIds",
                "enableImages": "false",
                "enableUserData": "false",
                "enableTotalRecordCount": "false",
            },
        )
        return (res or {}).get("Items", [])

    def user_data_many(self, user_id: str, ids: list[str]) -> dict[str, dict]:
        """{item id: UserData} of many items for one user, a hundred per request."""
        legacy = self.ensure_version().legacy
        path = f"/Users/{user_id}/Items" if legacy else "/Items"
        out: dict[str, dict] = {}
        for i in range(0, len(ids), IDS_PER_REQUEST):
            query = {
                "ids": ",".join(ids[i : i + IDS_PER_REQUEST]),
                "enableImages": "false",
                "enableUserData": "true",
                "enableTotalRecordCount": "false",
                **({} if legacy else {"userId": user_id}),
            }
            for dto in (self.request("GET", path, query) or {}).get("Items", []):
                if dto.get("Id"):
                    out[normalise_id(dto["Id"])] = dto.get("UserData") or {}
        return out

    # user data
    def user_data(self, user_id: str, item_id: str) -> dict:
        if self.ensure_version().legacy:
            item = self.request("GET", f"/Users/{user_id}/Items/{item_id}")
            return (item or {}).get("UserData") or {}
        return self.request("GET", f"/UserItems/{item_id}/UserData", {"userId": user_id}) or {}

    def set_played(
        self, user_id: str, item_id: str, played: bool, date: float | None = None
    ) -> dict:
        legacy = self.ensure_version().legacy
        method = "POST" if played else "DELETE"
        query: dict[str, Any] = {}
        if played and date is not None:
            query["datePlayed"] = datetime.fromtimestamp(date, UTC).strftime("%Y%m%d%H%M%S")
        if legacy:
            return self.request(method, f"/Users/{user_id}/PlayedItems/{item_id}", query) or {}
        return (
            self.request(method, f"/UserPlayedItems/{item_id}", {"userId": user_id, **query}) or {}
        )

    def set_favorite(self, user_id: str, item_id: str, on: bool) -> dict:
        method = "POST" if on else "DELETE"
        if self.ensure_version().legacy:
            return self.request(method, f"/Users/{user_id}/FavoriteItems/{item_id}") or {}
        return self.request(method, f"/UserFavoriteItems/{item_id}", {"userId": user_id}) or {}

    def set_likes(self, user_id: str, item_id: str, likes: bool | None) -> dict:
        method = "DELETE" if likes is None else "POST"
        query = {} if likes is None else {"likes": "true" if likes else "false"}
        if self.ensure_version().legacy:
            return self.request(method, f"/Users/{user_id}/Items/{item_id}/Rating", query) or {}
        return (
            self.request(method, f"/UserItems/{item_id}/Rating", {"userId": user_id, **query}) or {}
        )

    def update_user_data(self, user_id: str, item_id: str, data: dict) -> dict:
        # 10.8 has no API-key route for this at all (docs/jellyfin.md §2): callers check first.
        return (
            self.request("POST", f"/UserItems/{item_id}/UserData", {"userId": user_id}, data) or {}
        )


# ── Library ──────────────────────────────────────────────────────────────────


def item_info(server: ServerConfig, dto: dict) -> ItemInfo:
    """Index row for one BaseItemDto; the path goes through the server's path_map."""
    path = dto.get("Path")
    path_key = None
    if path:
        path_key = normalise_path(path)
        for theirs, shared in server.path_map:
            if path_key == theirs or path_key.startswith(theirs + "/"):
                path_key = shared + path_key[len(theirs) :]
                break
    prov = {k.lower(): str(v) for k, v in (dto.get("ProviderIds") or {}).items() if v}
    return ItemInfo(
        server.name,
        normalise_id(dto["Id"]),
        str(dto.get("Type", "")),
        str(dto.get("Name", "")),
        path_key,
        prov.get("imdb"),
        prov.get("tmdb"),
        prov.get("tvdb"),
        normalise_id(dto["SeriesId"]) if dto.get("SeriesId") else None,
        dto.get("ParentIndexNumber"),
        dto.get("IndexNumber"),
        dto.get("RunTimeTicks"),
        dto.get("ProductionYear") if isinstance(dto.get("ProductionYear"), int) else None,
    )


class Library:
    """Per-server item and user indexes in SQLite, and matching items across servers."""

    def __init__(self, config: Config, store: Store, clients: dict[str, JellyfinClient]):
        self.config = config
        self.store = store
        self.clients = clients
        self._index_locks = {s.name: threading.RLock() for s in config.servers}
        self._user_locks = {s.name: threading.Lock() for s in config.servers}
        self._last_refresh: dict[str, float] = {}
        self._refreshed_at: dict[str, float] = {}  # server → when (epoch) its last refresh began
        self._last_user_refresh: dict[str, float] = {}

    # item index
    def refresh_index(self, server: str, full: bool = False) -> int:
        """Page through new or changed items (all of them the first time). Returns rows seen."""
        client = self.clients[server]
        cfg = client.server
        with self._index_locks[server]:
            mark = None if full else self.store.get_meta(f"index_watermark:{server}")
            started = utcnow()
            seen = start = 0
            while True:
                page = client.items_page(start, INDEX_PAGE_SIZE, mark)
                if page:
                    self.store.upsert_items([item_info(cfg, dto) for dto in page if dto.get("Id")])
                seen += len(page)
                if len(page) < INDEX_PAGE_SIZE:
                    break
                start += len(page)
            # Overlap by a few minutes: the server's clock is not ours, and re-reading a few
            # items is cheaper than missing one.
            self.store.set_meta(
                f"index_watermark:{server}", format_time(started - INDEX_OVERLAP_SECONDS)
            )
            self._last_refresh[server] = time.monotonic()
            self._refreshed_at[server] = started
            log.debug(
                "%s: item index %s: %d rows",
                server,
                "rebuilt" if mark is None else "refreshed",
                seen,
            )
            return seen

    def ensure_index(self, server: str) -> None:
        """The item index of ``server``, built in full the first time (by whichever thread needs
        it first: the upkeep, a writer or a pass; the others wait for it, and build nothing)."""
        if self.store.get_meta(f"index_watermark:{server}") is not None:
            return
        with self._index_locks[server]:  # re-entered by refresh_index
            if self.store.get_meta(f"index_watermark:{server}") is None:
                log.info("%s: building the item index (first run)", server)
                self.refresh_index(server, full=True)

    def _refresh_if_due(self, server: str) -> bool:
        last = self._last_refresh.get(server)
        if last is not None and time.monotonic() - last < self.config.sync.index_refresh_seconds:
            return False
        self.refresh_index(server)
        return True

    def mark_stale(self, server: str) -> None:
        """An ItemAdded arrived: the next miss on this server may refresh at once."""
        self._last_refresh.pop(server, None)

    def source_item(self, server: str, item_id: str) -> ItemInfo | None:
        """The item an event is about, from the index or one request (webhooks carry no path)."""
        item = self.store.get_item(server, item_id)
        if item is None:
            dtos = self.clients[server].items_by_ids([item_id])
            rows = [item_info(self.clients[server].server, d) for d in dtos if d.get("Id")]
            if rows:
                self.store.upsert_items(rows)
            item = self.store.get_item(server, item_id)
        return item

    def lookup(self, src: ItemInfo, target: str) -> ItemInfo | None:
        """The same item in ``target``'s index as it is now (no refresh, no request)."""
        if src.server == target:
            return src  # an undo, an import or a discard writes on the server the item is from
        if src.path_key and src.type not in NAMED_ITEM_TYPES:
            hits = self.store.find_items(target, "path_key", src.path_key)
            if len(hits) == 1:
                return hits[0]
        for column in ("imdb", "tmdb", "tvdb"):
            value = getattr(src, column)
            if value:
                hits = [
                    h for h in self.store.find_items(target, column, value) if h.type == src.type
                ]
                if len(hits) == 1:
                    return hits[0]
        if (
            src.type == "Episode"
            and src.series_id
            and src.season is not None
            and src.episode is not None
        ):
            # An episode carries only its own IDs; match its series by provider ID, then S/E.
            series = self.source_item(src.server, src.series_id)
            if series:
                ids = {c: getattr(series, c) for c in ("tvdb", "tmdb", "imdb")}
                return self.episode_of(target, ids, src.season, src.episode)
        if src.type == "Season" and src.series_id and src.episode is not None:
            # A season seldom has ids of its own, nor a path where the show's seasons are not
            # folders: its show, by the same rules, then its number.
            series = self.source_item(src.server, src.series_id)
            tseries = self.lookup(series, target) if series and series.type == "Series" else None
            if tseries is not None:
                hits = self.store.find_season(target, tseries.item_id, src.episode)
                if len(hits) == 1:
                    return hits[0]
        if src.type in FOLDER_ITEM_TYPES and src.type != "Season" and src.name:
            # A show or an album in another folder, or an artist, a collection or a playlist
            # (NAMED_ITEM_TYPES), often without a provider id: the name and year, if only one
            # item of that type has them — never a guess between several.
            hits = self.store.find_named(target, src.type, src.name, src.year)
            if len(hits) == 1:
                return hits[0]
        return None

    def episode_of(self, target: str, ids: dict, season: int, episode: int) -> ItemInfo | None:
        """Season ``season`` episode ``episode`` of the series on ``target`` that has one of
        the provider ``ids`` ({"tvdb": …}; tvdb tried first, then tmdb, imdb): the first that
        is one item."""
        for column in ("tvdb", "tmdb", "imdb"):
            value = ids.get(column)
            if not value:
                continue
            for tseries in self.store.find_items(target, column, value):
                if tseries.type != "Series":
                    continue
                hits = self.store.find_episode(target, tseries.item_id, season, episode)
                if len(hits) == 1:
                    return hits[0]
        return None

    def lookup_many(self, srcs: list[ItemInfo], target: str) -> dict[str, str]:
        """{source item id: its id on ``target``} for those of ``srcs`` (a page of one server's
        items) found there, as ``lookup`` finds each: their paths in one query, and ``lookup``
        itself only for the few no path names once (provider IDs, series and episode next)."""
        by_path = [
            src for src in srcs if src.path_key and src.type not in NAMED_ITEM_TYPES
        ]  # as lookup
        hits = self.store.path_matches(target, [src.path_key for src in by_path]) if by_path else {}
        found: dict[str, str] = {}
        for src in srcs:
            same = (
                hits.get(src.path_key, [])
                if src.path_key and src.type not in NAMED_ITEM_TYPES
                else []
            )
            if len(same) == 1:
                found[src.item_id] = same[0]
            elif (match := self.lookup(src, target)) is not None:
                found[src.item_id] = match.item_id
        return found

    def explain_match(self, src: ItemInfo, target: str) -> tuple[ItemInfo | None, str]:
        """The same item on ``target`` and how it was found — or, for a person asking "why isn't
        this synced?", why it was not (the same rules and order as ``lookup``)."""
        if src.server == target:
            return src, "this item"
        found = self.lookup(src, target)
        if found is None:
            # Said as a person reads it: "path /media/…", not our column's name.
            looked = [
                f"{'path' if c == 'path_key' else c} {getattr(src, c)}"
                for c in ("path_key", "imdb", "tmdb", "tvdb")
                if getattr(src, c) and not (c == "path_key" and src.type in NAMED_ITEM_TYPES)
            ]
            if src.type in FOLDER_ITEM_TYPES and src.type != "Season":
                looked.append(
                    f"the one {src.type} named {src.name!r}"
                    + (f" of {src.year}" if src.year else "")
                )
            tried = ", ".join(looked)
            return (
                None,
                f"not found on {target} (looked for "
                f"{tried or 'nothing: the item has no path or provider id'})",
            )
        if src.path_key and found.path_key == src.path_key and src.type not in NAMED_ITEM_TYPES:
            return found, "same file (path)"
        for column in ("imdb", "tmdb", "tvdb"):
            if getattr(src, column) and getattr(src, column) == getattr(found, column):
                return found, f"same {column} id"
        if src.type == "Season":
            return found, "same show and season number"
        if src.type in FOLDER_ITEM_TYPES:
            return found, "same name and year"
        return found, "same series, season and episode"

    def display_name(self, item: ItemInfo) -> str:
        """An item as people know it: an episode or a season with its series ("Show — S01E04 —
        Title", "Show — Season 1")."""
        kind = item.type if item.series_id else ""
        series = (
            self.store.get_item(item.server, item.series_id)
            if kind in ("Episode", "Season")
            else None
        )
        if series and kind == "Season":
            return f"{series.name} — {item.name}"
        return (
            episode_name(series.name, item.season, item.episode, item.name) if series else item.name
        )

    def match(self, src: ItemInfo, target: str, waiting_since: float = 0.0) -> ItemInfo | None:
        """The same item on ``target``: by path, then provider IDs, then series + S/E.

        A miss refreshes the target's index incrementally (at most once per
        ``index_refresh_seconds``) and looks again — never a full library download. A change
        that has been waiting for its item since ``waiting_since`` refreshes it if no refresh
        began since then: the item may have been imported meanwhile, and ItemAdded is the
        plugin's least reliable event. The changes waiting on one server share that one
        request per retry round (the first to look refreshes; the others find it newer).
        """
        self.ensure_index(target)
        found = self.lookup(src, target)
        if found is None:
            if waiting_since and self._refreshed_at.get(target, 0.0) < waiting_since:
                self.refresh_index(target)
                refreshed = True
            else:
                refreshed = self._refresh_if_due(target)
            if refreshed:
                found = self.lookup(src, target)
        return found

    # users
    def refresh_users(self, server: str) -> list[dict]:
        """Re-read ``server``'s users into the index; returns them as read (UserDto, with each
        one's Configuration: a pass compares preferences from this same request)."""
        with self._user_locks[server]:
            users = self.clients[server].users()
            self.store.replace_users(
                server,
                [
                    (
                        normalise_id(u["Id"]),
                        str(u.get("Name", "")),
                        bool((u.get("Policy") or {}).get("IsAdministrator")),
                    )
                    for u in users
                    if u.get("Id")
                ],
            )
            self._last_user_refresh[server] = time.monotonic()
        return users

    def ensure_users(self, server: str) -> None:
        if server not in self._last_user_refresh:
            self.refresh_users(server)

    def user(self, server: str, key: str, refresh_on_miss: bool = True) -> UserRow | None:
        """The user on ``server`` whose case-folded name is ``key``; None if absent. A miss
        re-reads the server's users (at most once per ``index_refresh_seconds``).

        Raises SyncError when the server holds case-variant duplicates: never guess.
        """
        rows = self.store.find_users(server, key)
        if not rows and refresh_on_miss:
            last = self._last_user_refresh.get(server)
            if last is None or time.monotonic() - last >= self.config.sync.index_refresh_seconds:
                self.refresh_users(server)
                rows = self.store.find_users(server, key)
        if len(rows) > 1:
            names = ", ".join(sorted(r.name for r in rows))
            raise SyncError(
                f"{server} has several users named like {key!r} ({names}); skipped, fix by hand"
            )
        return rows[0] if rows else None

    def user_id(self, server: str, person: str) -> str | None:
        """The id of ``person``'s account on ``server`` (under the name users.map gives them
        there); None if they have none. Raises SyncError as ``user`` does."""
        row = self.user(server, self.config.name_on(person, server))
        return row.user_id if row is not None else None

    def forget_users(self, server: str) -> None:
        self._last_user_refresh.pop(server, None)

    def synced_accounts(self) -> Iterator[tuple[str, UserRow]]:
        """(person, account) for each account of a synced person (users.include/exclude) in the
        user index as it is, by person and server: whom a pass, the recent check and an export
        read."""
        for row in self.store.all_users():
            person = self.config.person(row.server, row.name)
            if self.config.user_synced(person):
                yield person, row

    def refresh_users_and_index(self, server: str) -> list[dict]:
        """Where a pass, an export and an import start on ``server``: its users read again (and
        returned: each holds the person's preferences), and its item index there (built in full
        the first time)."""
        users = self.refresh_users(server)
        self.ensure_index(server)
        return users


# ── Fields ───────────────────────────────────────────────────────────────────
# Every synced field, declared once (docs/design.md §9): its switch, how a webhook and a server
# report it, how it is written, how values from several servers merge, whether a change takes
# state away (the brake), and how it is said to a person. The Planner, the writers, the brake,
# undo, the journal, export/import, the inspector and the dashboard's labels all read REGISTRY;
# none of them names a field's rules again. Adding a field is one entry here plus its tests.

MISSING = object()  # a webhook that does not report a field


@dataclass(frozen=True)
class WriteRequest:
    """What one field's write needs: the target, the person there, the item and the value."""

    client: JellyfinClient
    version: ServerVersion
    user_id: str
    item_id: str
    job: Job
    want: Any
    current: dict  # the target's UserItemDataDto as read before the write
    sync: SyncConfig


@dataclass(frozen=True)
class SyncedField:
    """One synced field. ``scope``: "item" (a person's user data of one item: a job per target,
    person, item and field), "carried" (written with another field's write: shown and exported,
    never a job of its own), "account" (a user on a server) or "person" (one value per person
    and server, no item: a setting in their UserConfiguration; jobs, states and the journal use
    the item id PERSON_ITEM). For "person", ``read`` takes the UserConfiguration and ``write``
    is (UserConfiguration, value) → the UserConfiguration to send back."""

    name: str  # the code in jobs, states, the journal and the API
    label: str  # what a person reads for it (the dashboard's labels come from here)
    settings: tuple[str, ...]  # config switches ("sync.favorites") that must all be on
    scope: str = "item"
    read: Any = None  # a server's UserItemDataDto → the value
    from_event: Any = None  # a webhook body → the value it truly reports, or MISSING
    say: Any = str  # a value → words ("unfavourited")
    removed: str = ""  # a change taking state away, as the brake's summary counts it
    takes_away: Any = None  # value → bool: does setting it take state away (the brake)?
    merge: Any = None  # (a, b) → the value a first sight keeps (union, furthest …), commutative
    nothing: Any = None  # the value that says nothing: a first sight never spreads it
    dated: bool = False  # LastPlayedDate says when it was set: newest wins by that date
    # Writing it also sets these on the server (played or unplayed → position 0); once it is
    # True they are moot: not compared, not written, and their reset is no removal.
    resets: tuple[tuple[str, Any], ...] = ()
    # The re-watch trap (docs/jellyfin.md §1): False with a play count is a re-watch under way,
    # not a change; and a server's False never outweighs another's True without a seen change.
    rewatch_trap: bool = False
    # A pass reads a person's lists (played, favourite, resumable, liked): an item that left the
    # list of such a field may hold either of two values (unplayed or a re-watch; disliked or
    # cleared), and only reading the item tells which.
    left_list_ambiguous: bool = False
    needs: tuple[str, str] = ("", "")  # (a ServerVersion capability its write needs, why not)
    scaled: bool = False  # a position: scaled by the runtimes of source and target
    debounced: bool = False  # progress reports: written once they stop coming for a moment
    write: Any = None  # WriteRequest → the new UserItemDataDto (or {})
    from_file: Any = None  # an export file's value (people may edit it) → a sound value
    show: str = "value"  # how the dashboard shows a value: value, yes/no, like, ticks, date
    undoable: bool = True
    # Changed on several servers at once with no date to tell: True → the "positive" value wins
    # (played, favourite, the further position); False → the first server in the config's order.
    ranked: bool = True
    # Also on folders (FOLDER_ITEM_TYPES: shows, seasons, albums, artists, collections,
    # playlists; issue 26)? A folder's played state, count and position are the server's sum of
    # its contents, not something set on it: writing "played" on a show marks every episode.
    folders: bool = False

    def applies_to(self, item_type: str) -> bool:
        """Does this field travel for an item of ``item_type``?"""
        return self.folders or item_type not in FOLDER_ITEM_TYPES

    def enabled(self, config: Config) -> bool:
        """Are this field's switches all on in ``config``?"""
        return all(
            getattr(getattr(config, s.split(".")[0]), s.split(".")[1]) for s in self.settings
        )

    def describe(self, value: Any) -> str:
        return self.say(value)

    def on_target(self, value: Any, src_runtime: int | None, tgt_runtime: int | None) -> Any:
        """The value to write on a target: a position keeps its fraction where runtimes differ
        (another cut, another encode)."""
        if self.scaled and value and src_runtime and tgt_runtime and src_runtime != tgt_runtime:
            return int(value * tgt_runtime / src_runtime)
        return int(value) if self.scaled else value

    def removal(self, value: Any) -> str:
        """A change that takes state away, as the brake's summary says it ("42 unfavourited")."""
        return self.removed if self.takes_away and self.takes_away(value) else self.say(value)

    def public(self) -> dict:
        """What the dashboard reads of it (GET /api/fields)."""
        return {"name": self.name, "label": self.label, "scope": self.scope, "show": self.show}


def _any_true(a: Any, b: Any) -> bool:
    return bool(a) or bool(b)


def _like_over_dislike(a: Any, b: Any) -> bool | None:
    rated = [v for v in (a, b) if v is True or v is False]
    return (True in rated) if rated else None


def _furthest(a: Any, b: Any) -> int:
    return max(int(a or 0), int(b or 0))


def _likes_read(ud: dict) -> bool | None:
    rating = ud.get("Rating")
    if rating is None:
        return ud.get("Likes")  # derived by the server: Rating ≥ 6.5, or null
    return bool(rating >= LIKE_RATING)


def likes_from_event(ev: dict) -> bool | None:
    """The plugin sends ``Likes`` false when unset; ``Rating`` tells (0 = none, ≥ 6.5 = like)."""
    rating = ev.get("Rating")
    if isinstance(rating, int | float):
        if rating == 0:
            return None
        return rating >= LIKE_RATING
    return True if ev.get("Likes") else None


# Which webhook reports a field truthfully, by type and SaveReason (docs/jellyfin.md §1). The
# re-watch trap: PlaybackStart forces Played=false on a resumable video, so Played=false is never
# taken from playback (start, progress or a stop before the end) — only Played=true.
_RATING_REASONS = ("UpdateUserRating", "UpdateUserData")
_POSITION_REASONS = ("PlaybackProgress", "PlaybackFinished", "UpdateUserData")


def _saved(ev: dict, reasons: tuple[str, ...]) -> bool:
    return ev["NotificationType"] == "UserDataSaved" and ev.get("SaveReason") in reasons


def _played_from_event(ev: dict) -> Any:
    if _saved(ev, ("TogglePlayed", "Import", "UpdateUserData")) and "Played" in ev:
        return bool(ev["Played"])
    if _saved(ev, ("PlaybackFinished",)) and ev.get("Played") is True:
        # Stopping a re-watch part-way leaves Played=false (set at PlaybackStart): only
        # "finished" is news; "unplayed" comes from a deliberate TogglePlayed alone.
        return True
    if ev["NotificationType"] == "PlaybackStop" and ev.get("PlayedToCompletion"):
        return True
    return MISSING


def _position_from_event(ev: dict) -> Any:
    pos = ev.get("PlaybackPositionTicks")
    ntype = ev["NotificationType"]
    if ntype == "PlaybackStop" and ev.get("PlayedToCompletion"):
        return 0  # the server resets the position when it marks played
    if _saved(ev, _POSITION_REASONS) or ntype in ("PlaybackProgress", "PlaybackStop"):
        return pos if isinstance(pos, int) else MISSING
    return MISSING


def _favorite_from_event(ev: dict) -> Any:
    return bool(ev["Favorite"]) if _saved(ev, _RATING_REASONS) and "Favorite" in ev else MISSING


def _likes_from_event(ev: dict) -> Any:
    return likes_from_event(ev) if _saved(ev, _RATING_REASONS) else MISSING


def _newest(a: Any, b: Any) -> float | None:
    return max([t for t in (a, b) if t], default=None)


def _whole(value: Any) -> int:
    """A count or a position from a file people may have edited: a whole number ≥ 0, else 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _say_position(value: Any) -> str:
    secs = int(value or 0) // TICKS_PER_SECOND
    return f"position {secs // HOUR}:{secs % HOUR // 60:02d}:{secs % 60:02d}"


def _write_played(w: WriteRequest) -> dict:
    if not w.want:
        return w.client.set_played(w.user_id, w.item_id, False)
    last = w.job.extra.last_played if w.sync.last_played_date else None
    if w.version.legacy:
        # 10.8: the only API-key route. datePlayed also bumps PlayCount by one.
        return w.client.set_played(w.user_id, w.item_id, True, last)
    # 10.9+: one /UserData write sets the flag, the date and the count exactly. PlayCount =
    # max(target's, source's, 1) — never a sum, because every server counts its own playback
    # starts; LastPlayedDate = the newer of the two.
    count = int(w.current.get("PlayCount") or 0)
    if w.sync.play_count:
        count = max(count, int(w.job.extra.play_count or 0))
    newest = _newest(last, parse_time(w.current.get("LastPlayedDate")))
    body = {
        "Played": True,
        "PlaybackPositionTicks": 0,
        "PlayCount": max(count, 1),
        "LastPlayedDate": format_time(newest or utcnow()),
    }
    return w.client.update_user_data(w.user_id, w.item_id, body)


def _write_position(w: WriteRequest) -> dict:
    body: dict[str, Any] = {"PlaybackPositionTicks": int(w.want)}
    last = w.job.extra.last_played if w.sync.last_played_date else None
    tgt_last = parse_time(w.current.get("LastPlayedDate"))
    if w.want and last and (tgt_last is None or last > tgt_last):
        body["LastPlayedDate"] = format_time(last)  # "Continue watching" is in this order
    return w.client.update_user_data(w.user_id, w.item_id, body)


def _account_words(value: Any) -> str:
    return str(value.get("name", "")) if isinstance(value, dict) else str(value)


def _account(name: str, setting: str, verb: str) -> SyncedField:
    """An account change (a user created, deleted or renamed on a server): never undone."""

    def say(value: Any) -> str:
        return f"{verb} {_account_words(value)}"

    return SyncedField(
        name=name, label="account", settings=(setting,), scope="account", say=say, undoable=False
    )


PERSON_ITEM = "-"  # the item id of a "person" field (and of an account change) in jobs and states
_CLASH = object()  # a first sight where servers hold different set values: none of them wins


def _set_over_unset(unset: Any) -> Any:
    """The first-sight merge of a preference: a value that is set beats the unset/default one;
    two different set values clash (nobody's choice is taken over another's: left alone)."""

    def merge(a: Any, b: Any) -> Any:
        if a is _CLASH or b is _CLASH:
            return _CLASH
        if a in (unset, b):
            return b
        return a if b == unset else _CLASH

    return merge


# SubtitlePlaybackMode, as the dashboard and the journal say it
_SUBTITLE_MODES = {
    "Default": "default",
    "Always": "always",
    "OnlyForced": "only forced",
    "None": "none",
    "Smart": "smart",
}


def _preference(name: str, label: str, key: str, unset: Any, say: Any = None) -> SyncedField:
    """One of a person's language and playback preferences (UserConfiguration ``key``; its
    default there is ``unset``). Read from GET /Users, written by PreferenceWriter; no webhook
    reports them, so passes and RecentCheck compare them."""
    if isinstance(unset, bool):
        read = lambda cfg: bool(cfg.get(key, unset))  # noqa: E731
        say = say or (lambda v: "on" if v else "off")
    else:  # a language: null (left out) and "" both mean "none chosen"
        read = lambda cfg: str(cfg.get(key) or unset)  # noqa: E731
        say = say or (lambda v: v or "none")
    return SyncedField(
        name=name,
        label=label,
        settings=("sync.preferences",),
        scope="person",
        read=read,
        say=say,
        merge=_set_over_unset(unset),
        nothing=unset,
        needs=(
            "writes_user_settings",
            "Jellyfin 10.8 cannot change a person's settings with an API key",
        ),
        write=lambda cfg, want: {**cfg, key: want},
        show="yes/no" if isinstance(unset, bool) else "value",
        ranked=False,
    )


REGISTRY: dict[str, SyncedField] = {
    f.name: f
    for f in (
        SyncedField(
            name="played",
            label="watched",
            settings=("sync.watched_status",),
            read=lambda ud: bool(ud.get("Played", False)),
            from_event=_played_from_event,
            say=lambda v: "played" if v else "unplayed",
            removed="unplayed",
            takes_away=lambda v: v is False,
            merge=_any_true,
            nothing=False,
            from_file=bool,
            dated=True,
            resets=(("position", 0),),  # marking played or unplayed resets the position
            rewatch_trap=True,
            left_list_ambiguous=True,
            write=_write_played,
            show="yes/no",
        ),
        SyncedField(
            name="position",
            label="position",
            settings=("sync.playback_progress",),
            read=lambda ud: int(ud.get("PlaybackPositionTicks") or 0),
            from_event=_position_from_event,
            say=_say_position,
            removed="position reset",
            takes_away=lambda v: not v,
            merge=_furthest,
            nothing=0,
            from_file=_whole,
            dated=True,
            needs=("sets_positions", "Jellyfin 10.8 cannot set a resume position with an API key"),
            scaled=True,
            debounced=True,
            write=_write_position,
            show="ticks",
        ),
        SyncedField(
            name="favorite",
            label="favourite",
            settings=("sync.favorites",),
            read=lambda ud: bool(ud.get("IsFavorite", False)),
            from_event=_favorite_from_event,
            say=lambda v: "favourite" if v else "not favourite",
            removed="unfavourited",
            takes_away=lambda v: v is False,
            merge=_any_true,
            nothing=False,
            from_file=bool,
            write=lambda w: w.client.set_favorite(w.user_id, w.item_id, bool(w.want)),
            show="yes/no",
            folders=True,
        ),
        SyncedField(
            name="likes",
            label="rating",
            settings=("sync.ratings", "sync.likes"),
            read=_likes_read,
            from_event=_likes_from_event,
            say=lambda v: {True: "liked", False: "disliked", None: "rating cleared"}[v],
            removed="rating cleared",
            takes_away=lambda v: v is None,
            merge=_like_over_dislike,
            nothing=None,
            left_list_ambiguous=True,
            from_file=lambda v: v if v is True or v is False else None,
            write=lambda w: w.client.set_likes(w.user_id, w.item_id, w.want),
            show="like",  # three states: liked, disliked, none
            folders=True,
        ),
        # Written with "played" (the count and date of a play travel with it): shown and exported.
        SyncedField(
            name="play_count",
            label="play count",
            settings=("sync.play_count",),
            scope="carried",
            read=lambda ud: int(ud.get("PlayCount") or 0),
            merge=_furthest,
            nothing=0,
            from_file=_whole,
        ),
        SyncedField(
            name="last_played",
            label="last played",
            settings=("sync.last_played_date",),
            scope="carried",
            read=lambda ud: ud.get("LastPlayedDate"),
            merge=_newest,
            from_file=parse_time,
            show="date",
        ),
        # Accounts: created, deleted and renamed by AccountWriter; never undone.
        _account("user_create", "users.create", "created"),
        _account("user_delete", "users.delete", "deleted"),
        _account("user_rename", "users.rename", "renamed to"),
        # A person's language and playback preferences (issue 26.2). Never OrderedViews,
        # GroupedFolders, MyMediaExcludes or LatestItemsExcludes: they hold one server's library
        # ids. Nor DisplayMissingEpisodes and the like: display choices may differ on purpose.
        _preference("audio_language", "audio language", "AudioLanguagePreference", ""),
        _preference("subtitle_language", "subtitle language", "SubtitleLanguagePreference", ""),
        _preference(
            "subtitle_mode",
            "subtitle mode",
            "SubtitleMode",
            "Default",
            lambda v: _SUBTITLE_MODES.get(v, str(v)),
        ),
        _preference(
            "play_default_audio", "play default audio track", "PlayDefaultAudioTrack", True
        ),
        _preference("remember_audio", "remember audio selections", "RememberAudioSelections", True),
        _preference(
            "remember_subtitles", "remember subtitle selections", "RememberSubtitleSelections", True
        ),
        _preference(
            "next_episode", "play next episode automatically", "EnableNextEpisodeAutoPlay", True
        ),
    )
}
# The fields a job carries (one per target, person, item and field), in the order a claim's
# jobs for one item are written.
FIELDS = tuple(f.name for f in REGISTRY.values() if f.scope == "item")
FIELD_ORDER = {f: i for i, f in enumerate(FIELDS)}
AMBIGUOUS_OFF_LIST = tuple(f.name for f in REGISTRY.values() if f.left_list_ambiguous)
EXPORTED = tuple(
    f for f in REGISTRY.values() if f.scope in ("item", "carried")
)  # export, inspector
PREFERENCES = tuple(f.name for f in REGISTRY.values() if f.scope == "person")


def synced(name: str) -> SyncedField:
    """The registry's entry; SyncError (never a guess) for a field we do not know."""
    entry = REGISTRY.get(name)
    if entry is None:
        raise SyncError(f"unknown field {name!r}")
    return entry


def read_fields(user_data: dict) -> dict[str, Any]:
    """Our item fields from a UserItemDataDto (as returned by GET or by a write)."""
    return {f.name: f.read(user_data) for f in REGISTRY.values() if f.scope == "item"}


def read_preferences(configuration: dict) -> dict[str, Any]:
    """Our "person" fields from a UserConfiguration (GET /Users → Configuration)."""
    return {f.name: f.read(configuration) for f in REGISTRY.values() if f.scope == "person"}


def observations_from_event(ev: dict) -> dict[str, Any]:
    """Which of our fields this event reports truthfully (each field's ``from_event``)."""
    out = {}
    kind = str(ev.get("ItemType") or "")
    for f in REGISTRY.values():
        if f.from_event is not None and f.applies_to(kind):  # a show's heart, not its "played"
            value = f.from_event(ev)
            if value is not MISSING:
                out[f.name] = value
    return out


def takes_state_away(fld: str, value: Any, moot: set[str]) -> bool:
    """What the brake counts: unplayed, unfavourited, rating cleared, or a resume position reset
    — unless ``moot`` (moot_fields of the same change) holds the field: finishing an item resets
    its position too, and that is no removal."""
    entry = synced(fld)
    return entry.takes_away is not None and entry.takes_away(value) and fld not in moot


def moot_fields(values: dict[str, Any]) -> set[str]:
    """The fields that another's True makes moot (played → its position is reset anyway)."""
    return {
        other
        for name, v in values.items()
        if v is True and name in REGISTRY
        for other, _ in REGISTRY[name].resets
    }


def removal_word(fld: str, value: Any) -> str:
    return synced(fld).removal(value)


def describe(fld: str, value: Any) -> str:
    return synced(fld).describe(value)


# ── Webhooks ─────────────────────────────────────────────────────────────────


def parse_webhook(body: bytes) -> dict:
    """Validate and normalise one plugin body. Raises WebhookError (400) for anything else.

    The plugin sends ``text/plain`` whatever the body is (docs/jellyfin.md §1), so the content type
    is not looked at. Templates give dashed GUIDs and True/False; both are normalised here.
    """
    data = _json_object(body)
    ntype = data.get("NotificationType")
    if not isinstance(ntype, str) or not ntype:
        raise WebhookError("missing NotificationType: is this the Jellyfin Webhook plugin?")
    if ntype not in ACTED_ON:
        return data
    data = _kept_values(data)
    _check_required(ntype, data)
    return data


def _json_object(body: bytes) -> dict:
    """The body as a JSON object: UTF-8, not nested too deep, no string too long."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise WebhookError("body is not UTF-8 text") from None
    if not text.strip():
        raise WebhookError("empty body: expected the Webhook plugin's JSON")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise WebhookError("body is not valid JSON") from None
    if not isinstance(data, dict):
        raise WebhookError("body must be a JSON object")
    # Cheap pre-checks keep the common case fast: a flat body has one "{" (strings may hold
    # more, then the exact walk decides), and no string can be longer than the whole body.
    if (text.count("{") > 1 or "[" in text) and _depth(data) > MAX_JSON_DEPTH:
        raise WebhookError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    if len(text) > MAX_STRING_CHARS:
        for k, v in data.items():
            if isinstance(v, str) and len(v) > MAX_STRING_CHARS:
                raise WebhookError(f"{k}: string longer than {MAX_STRING_CHARS} characters")
    return data


def _kept_values(data: dict) -> dict:
    """What the sync uses, each value checked: stream details, overviews and the like are
    dropped before storing. Every kept value is checked here, at the door: a value the planner
    or SQLite cannot take would otherwise be acknowledged, stored and then fail behind it.
    (Every webhook passes here, hundreds a second in a burst: the common, already-clean values
    are let through first, the template forms are converted after.)"""
    data = {k: v for k, v in data.items() if k in KEEP_KEYS or k.startswith(PROVIDER_PREFIX)}
    for k, v in data.items():
        if v is None or k in TYPED_KEYS:
            continue
        if type(v) is int and k.startswith(PROVIDER_PREFIX):  # a template that left the quotes out
            v = data[k] = str(v)
        _check_text(k, v)
    for k in ID_KEYS:
        v = data.get(k)
        if v is None or isinstance(v, str) and HEX32.fullmatch(v):
            continue
        if not isinstance(v, str):
            raise WebhookError(f"{k}: expected a GUID string")
        v = data[k] = normalise_id(v)
        if not HEX32.fullmatch(v):
            raise WebhookError(f"{k}: {_shorten(v)!r} is not a Jellyfin GUID")
    for k in BOOL_KEYS:
        v = data.get(k)
        if v is None or v is True or v is False:
            continue
        if not (isinstance(v, str) and v.lower() in ("true", "false")):
            raise WebhookError(f"{k}: expected true or false")
        data[k] = v.lower() == "true"
    for k in INT_KEYS:
        v = data.get(k)
        if type(v) is int and 0 <= v <= INT64_MAX:  # not isinstance: True is an int
            continue
        if v is None:
            continue
        if (
            isinstance(v, str)
            and re.fullmatch(r"\d{1,19}", v)
            or isinstance(v, float)
            and v.is_integer()
        ):
            v = int(v)
        elif type(v) is not int:
            raise WebhookError(f"{k}: expected a whole number")
        if not 0 <= v <= INT64_MAX:
            raise WebhookError(f"{k}: {v} is out of range (0 to {INT64_MAX})")
        data[k] = v
    for k in INT32_KEYS & data.keys():  # the server keeps these as 32-bit numbers
        if data[k] is not None and data[k] > INT32_MAX:
            raise WebhookError(f"{k}: {data[k]} is out of range (0 to {INT32_MAX})")
    for k in DATE_KEYS:
        v = data.get(k)
        if isinstance(v, str) and v.startswith(NO_DATE):
            data[k] = None  # "no date", whatever offset the plugin gave it
        elif v is not None and parse_time(v) is None:
            raise WebhookError(f"{k}: expected a date like 2026-11-24T07:28:59.0000000Z")
    if data.get("Rating") is not None:
        r = data["Rating"]
        if isinstance(r, str):
            try:
                r = float(r)
            except ValueError:
                raise WebhookError("Rating: expected a number") from None
        if isinstance(r, bool) or not isinstance(r, int | float) or not 0 <= r <= 10:
            raise WebhookError("Rating: expected a number from 0 to 10")
        data["Rating"] = r
    return data


def _check_required(ntype: str, data: dict) -> None:
    """The keys an event of this type cannot do without."""
    if ntype in ITEM_EVENTS:
        for k in ("ItemId", "UserId", "NotificationUsername"):
            if not data.get(k):
                raise WebhookError(f"{ntype} without {k}: tick 'Send All Properties' in the plugin")
    elif ntype in USER_EVENTS and not data.get("NotificationUsername"):
        raise WebhookError(f"{ntype} without NotificationUsername")
    elif ntype in ("ItemAdded", "ItemDeleted") and not data.get("ItemId"):
        raise WebhookError(f"{ntype} without ItemId")


def _error_text(e: Exception) -> str:
    """An exception as one line of text that SQLite, JSON and a log can always hold."""
    text = f"{type(e).__name__}: {e}" if not isinstance(e, SyncError) else str(e)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_text(key: str, value: Any) -> None:
    """A kept text value: a string SQLite can store (UTF-8: no lone surrogates), not too long."""
    if not isinstance(value, str):
        raise WebhookError(f"{key}: expected text, got {type(value).__name__}")
    if len(value) > MAX_STRING_CHARS:
        raise WebhookError(f"{key}: longer than {MAX_STRING_CHARS} characters")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise WebhookError(f"{key}: not valid Unicode text (a lone surrogate)") from None


def _shorten(value: str, limit: int = 40) -> str:
    return value[:limit] + ("…" if len(value) > limit else "")


def _depth(value: Any, level: int = 1) -> int:
    if level > MAX_JSON_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level)
    return level


def event_item_name(ev: dict) -> str:
    """An item as people know it: "Series — S01E04 — Title", "Series — Season 1", "Film (Year)"."""
    name = ev.get("Name") or ev["ItemId"]
    if ev.get("SeriesName") and ev.get("ItemType") == "Season":
        return f"{ev['SeriesName']} — {name}"
    if ev.get("SeriesName"):
        return episode_name(ev["SeriesName"], ev.get("SeasonNumber"), ev.get("EpisodeNumber"), name)
    if ev.get("Year"):
        return f"{name} ({ev['Year']})"
    return name


def episode_name(series: str, season: int | None, episode: int | None, title: str) -> str:
    return f"{series} — S{season or 0:02d}E{episode or 0:02d} — {title}"


# ── Planner ──────────────────────────────────────────────────────────────────


class Planner:
    """The one owner of the rules of what becomes a job, for webhooks and reconciliation passes
    alike (docs/design.md §3, §4): our own echoes are dropped, so is what we already know of a
    server and what is older than it (newest wins, per field); a newer desired state replaces a
    waiting one (coalescing); a webhook's date is not trusted beyond our clock; and an item a
    target lacks waits as its path_sync_policy says. The Store only runs its statements."""

    def __init__(self, config: Config, store: Store):
        self.config = config
        self.store = store
        self._clock_warnings = Throttle()  # per server

    def plan(self, batch: list[tuple[int, list[Observation]]]) -> tuple[list[str], int]:
        """Queue the jobs for a batch of (inbox id, or 0 for a pass; its observations), in one
        transaction. Returns (targets that got jobs, observations dropped)."""
        woken: set[str] = set()
        dropped = 0
        removing: set[tuple[str, str]] = set()  # (source, person) with removals in this batch
        with self.store.planning() as tx:
            for _inbox_id, observations in batch:
                news = self._news(tx, observations)
                dropped += len(observations) - len(news)
                # Finishing an item resets its position: that is no removal (news or not).
                reported: dict[tuple[str, str], dict[str, Any]] = {}
                for o in observations:
                    reported.setdefault((o.server, o.item_id), {})[o.field] = o.value
                moot = {key: moot_fields(values) for key, values in reported.items()}
                for ob in news:
                    removal = self.removes(ob, moot[(ob.server, ob.item_id)])
                    if removal:
                        removing.add((ob.server, ob.user_key))
                    for target in ob.targets:
                        self._queue(tx, target, ob, removal)
                        woken.add(target)
            for source, user_key in removing:
                self._brake(tx, source, user_key)
            tx.mark_planned([inbox_id for inbox_id, _ in batch if inbox_id])
        return sorted(woken), dropped

    @staticmethod
    def removes(ob: Observation, moot: set[str]) -> bool:
        """Does this change take state away: unplayed, unfavourited, rating cleared, or a resume
        position reset (other than by finishing the item: ``moot``)? Undo is a person's
        decision, previewed first: it is never braked."""
        if ob.cause.startswith(("undo:", "discard:")):
            return False
        return takes_state_away(ob.field, ob.value, moot)

    def _brake(self, tx: PlanTx, source: str, user_key: str) -> None:
        limit = self.config.safety.brake_items
        if not limit:
            return
        since = tx.now - self.config.safety.brake_minutes * 60
        released = self.store.brake_released(source, user_key)  # Apply starts the count afresh
        since = max(since, released)
        # More than ``limit`` items losing state: every such change not yet applied is held —
        # with removals settling before they go (issue 21), that is the whole burst.
        if tx.count_removals(source, user_key, since) <= limit:
            return
        held = tx.hold_removals(source, user_key, since)
        if not held:
            return
        # Once per burst: not again while this burst goes on (the brake held some of it within
        # its window), until it is applied or discarded; the dashboard keeps the running count.
        if tx.brake_announced(source, user_key, held=True) >= since:
            log.debug("brake: %d more change(s) from %s for %s held", held, source, user_key)
            return
        log.warning(
            "brake: changes from %s for %s held: more than %d items would lose state within %g "
            "minutes; "
            "the rest of this burst is held too (the dashboard counts them); apply or discard them "
            "there",
            source,
            user_key,
            limit,
            self.config.safety.brake_minutes,
        )

    def _news(self, tx: PlanTx, observations: list[Observation]) -> list[Observation]:
        """The observations that are news; what we now know of their server is recorded."""
        if not observations or observations[0].kind == "order":
            return list(observations)
        if self._is_echo(tx, observations):
            return []
        news = []
        acted = any(o.value != REGISTRY[o.field].nothing for o in observations)
        for ob in observations:
            value_json = json.dumps(ob.value)
            known = tx.state(ob)
            # Finishing a play is news even where the item was played already (a re-watch): a
            # server an undo put back to unplayed is marked again, as the person's new action.
            entry = REGISTRY[ob.field]
            if known is None and ob.value == entry.nothing and acted:
                # A webhook reports every field of its kind: a heart's carries the rating too.
                # Where another field of it is set, that is what the person did; this one, seen
                # for the first time and holding nothing, is no change, and spreading it would
                # clear what another server holds that we never saw (a like made there while we
                # were away). A pass never spreads a first sight of nothing either (decide()).
                continue
            finished = entry.rewatch_trap and ob.value is True and ob.extra.event == "PlaybackStop"
            if known is not None and (
                (known[0] == value_json and not finished) or known[1] > ob.observed_at
            ):
                # Same as what we last wrote/read there (an echo, or nothing new), or an older
                # observation arriving late: never overwrite newer with older.
                continue
            tx.set_state(ob, value_json)
            news.append(ob)
        return news

    @staticmethod
    def _is_echo(tx: PlanTx, observations: list[Observation]) -> bool:
        """True if these observations are exactly a state one of our writes should produce;
        that expectation is then used up (each write has one echo). No timer decides this."""
        ob = observations[0]
        for echo_id, snapshot in tx.expected_echoes(ob.server, ob.user_key, ob.item_id):
            if all(o.field in snapshot and snapshot[o.field] == o.value for o in observations):
                tx.forget_echo(echo_id)
                return True
        return False

    def _queue(self, tx: PlanTx, target: str, ob: Observation, removal: bool) -> None:
        """Coalesce: a newer desired state replaces the waiting one (its due time is kept, so a
        steady stream of progress reports cannot postpone the write forever). A removal waits
        safety.removal_delay_seconds first, so that the brake judges a burst before any of it
        goes out (issue 21); additions never wait for it."""
        delay = ob.delay
        if removal and self.config.safety.brake_items:
            delay = max(delay, self.config.safety.removal_delay_seconds)
        due = tx.now + delay
        waiting = tx.open_job(target, ob)
        if waiting is None:
            tx.add_job(target, ob, removal, due)
        elif ob.observed_at >= waiting.observed_at:
            # Its due time is kept, or made earlier by an addition (additions are never delayed
            # by a removal's settling time), or later by a removal (which settles in full: the
            # brake judges it first); a job waiting for its item keeps its own. A held removal
            # the person has since reversed is no longer held: the newer state goes.
            if waiting.status != "waiting":
                due = max(waiting.due_at, due) if removal else min(waiting.due_at, due)
            else:
                due = waiting.due_at
            status = "pending" if waiting.status == "held" and not removal else waiting.status
            tx.replace_job(waiting.id, ob, removal, due, status)

    # time
    def observed_at(self, server: str, utc_timestamp: Any, received: float) -> float:
        """When the source saw the change (the plugin's UtcTimestamp), else when we received it."""
        return self.not_ahead(
            server, "UtcTimestamp", parse_time(utc_timestamp) or received, received
        )

    def not_ahead(self, server: str, key: str, when: float, received: float) -> float:
        """``when``, but never later than CLOCK_SKEW_ALLOWANCE after we received it: a server
        whose clock runs ahead (or a forged date) would otherwise make every later real change
        look older. Said at most every CLOCK_WARNING_SECONDS per server."""
        if when <= received + CLOCK_SKEW_ALLOWANCE:
            return when
        if self._clock_warnings.due(server, CLOCK_WARNING_SECONDS):
            log.warning(
                "%s: a webhook's %s is %.0f s ahead of our clock; taken as the time it arrived "
                "(check the clock of that server)",
                server,
                key,
                when - received,
            )
        return received

    # items a target does not have (yet)
    def when_absent(self, job: Job, path_key: str | None) -> tuple[str, float, str]:
        """What a change does about an item its target lacks, by path_sync_policy (the longest
        matching prefix): ("waiting", when to look again, what to say); "absent" where no
        policy waits for it there: the item is simply not on that server, which is no failure
        (a later change or pass syncs it once it is); or "skipped" once the tries a policy
        gave it are used up: it was expected there, and someone may want to know why not."""
        policy = self.config.policy_for(path_key or "")
        tries = job.absent_count + 1
        msg = f"{job.item_name!r} not found on {job.target}"
        if policy.absent_retry_count == -1 or tries <= policy.absent_retry_count:
            return (
                "waiting",
                utcnow() + policy.retry_delay_seconds,
                f"{msg}; waiting for it to be imported (try {tries})",
            )
        if policy.absent_retry_count == 0:
            why = "no path_sync_policy waits for it there"
            return "absent", 0.0, f"{job.item_name!r} is not on {job.target} ({why})"
        return "skipped", 0.0, f"{msg}; gave up waiting for it to be imported (try {tries})"


# ── Writers ──────────────────────────────────────────────────────────────────


_KNOWN = "_known"  # key set in a group's ``current`` once the target's state is known (even blank)


@dataclass(frozen=True)
class Outcome:
    """What applying one job came to. Syncer._record is the one place that records it."""

    # done: ok, noop, stale, dry_run · absent (not on the target) · skipped · failed · retry,
    # waiting, unreachable
    result: str
    detail: str | None = None
    old: str | None = None
    new: str | None = None
    states: list | None = None  # what the target now holds, as Store.remember_states rows
    due_at: float = 0.0  # retry, waiting: when to try again
    # The journal of a write: the target's item, and {field: value} before and after it.
    item_id: str | None = None
    before: dict | None = None
    after: dict | None = None

    @property
    def done(self) -> bool:
        return self.result in ("ok", "noop", "stale", "dry_run")


class WatchStateWriter:
    """Writes one person's watch state for one item on a target: state-based, only what
    differs, each field through exactly one route so states cannot oscillate between servers."""

    def __init__(
        self, config: Config, store: Store, library: Library, clients: dict[str, JellyfinClient]
    ):
        self.config = config
        self.store = store
        self.library = library
        self.clients = clients

    def resolve(self, target: str, jobs: list[Job]) -> tuple[str, ItemInfo, ItemInfo | None]:
        """(the person's user id on target, the source item, the same item on target or None).
        Raises SyncError (skipped) or JellyfinError (retried)."""
        first = jobs[0]
        user_id = self.library.user_id(target, first.user_key)
        if user_id is None:
            raise SyncError(f"no user named {first.username!r} on {target}")
        src_item = self.library.source_item(first.source, first.source_item_id)
        if src_item is None:
            raise SyncError(f"item {first.source_item_id} no longer exists on {first.source}")
        return (
            user_id,
            src_item,
            self.library.match(src_item, target, max(j.waiting_since for j in jobs)),
        )

    def apply(self, job: Job, user_id: str, item: ItemInfo, current: dict) -> Outcome:
        """One job; ``current`` is the target's UserItemDataDto, read once for the whole group."""
        client = self.clients[job.target]
        version = client.ensure_version()
        entry = synced(job.field)
        capability, why_not = entry.needs
        if capability and not getattr(version, capability):
            raise SyncError(why_not)
        known = self.store.get_state(job.target, job.user_key, item.item_id)
        if job.field in known and known[job.field][1] > job.observed_at:
            return Outcome("stale", "a newer change is already there")
        if not current:
            state = self._target_state(job)
            current.update(state if state is not None else client.user_data(user_id, item.item_id))
            current[_KNOWN] = True  # even a blank state is known now
        have = read_fields(current)
        want = entry.on_target(job.value, job.extra.runtime, item.runtime)
        observed = {job.field: job.observed_at}
        if job.extra.is_undo and have[job.field] != job.extra.expect and have[job.field] != want:
            # An undo: only where the target still holds what we wrote. A newer change by the
            # person wins, and is reported, never clobbered.
            return Outcome(
                "skipped",
                f"not undone: {job.target} now holds {describe(job.field, have[job.field])}, "
                "changed since "
                f"we wrote {describe(job.field, job.extra.expect)}",
            )
        if have[job.field] == want:
            # Only this field: the group's other jobs may write the others before this outcome
            # is committed (with theirs, after their writes), and ``have`` is from before them.
            confirmed = {job.field: have[job.field]}
            rows = self.store.state_rows(
                job.target, job.user_key, item.item_id, confirmed, observed
            )
            return Outcome("noop", old=describe(job.field, have[job.field]), states=rows)
        if self.config.sync.dry_run:
            return Outcome("dry_run", new=describe(job.field, want))
        # Record the state we are about to create *before* writing: Jellyfin fires the echo
        # webhook while it handles our request, so it can arrive before the response does.
        expected = {**have, job.field: want, **dict(entry.resets)}
        self.store.prepare_write(job.target, job.user_key, item.item_id, expected, observed)
        try:
            written = entry.write(
                WriteRequest(
                    client, version, user_id, item.item_id, job, want, current, self.config.sync
                )
            )
        except Exception:
            # The write did not happen (as far as we know): what we recorded must not say it
            # did, or the next pass would read the target's real value as a change made there
            # and spread it back over the source — losing the very change being written.
            was = {f: have[f] for f in expected if f in have}
            times = {f: known[f][1] if f in known else 0.0 for f in was}
            self.store.remember_states(
                self.store.state_rows(job.target, job.user_key, item.item_id, was, times)
            )
            raise
        current.clear()
        rows = None
        if written:
            current.update(written)  # the write answers with the new state: no re-read needed
            current[_KNOWN] = True
            # Recorded before the write already; only what the server did otherwise is news.
            surprise = {f: v for f, v in read_fields(written).items() if expected.get(f) != v}
            rows = self.store.state_rows(job.target, job.user_key, item.item_id, surprise, observed)
        log.info(
            '%s: %s ✓ %s "%s" (from %s)',
            job.target,
            job.username,
            describe(job.field, want),
            job.item_name,
            job.source,
        )
        return self._written(job, item, have, want, rows)

    @staticmethod
    def _written(job: Job, item: ItemInfo, have: dict, want: Any, rows: list | None) -> Outcome:
        """A write's outcome with its journal: each field it changed, before and after."""
        before, after = {job.field: have[job.field]}, {job.field: want}
        for other, value in REGISTRY[job.field].resets:
            if have[other] != value:
                before[other], after[other] = have[other], value  # the server reset it
        return Outcome(
            "ok",
            old=describe(job.field, have[job.field]),
            new=describe(job.field, want),
            states=rows,
            item_id=item.item_id,
            before=before,
            after=after,
        )

    @staticmethod
    def _target_state(job: Job) -> dict | None:
        """The target's state as a reconciliation pass read it, if that was moments ago: the
        write is then planned from it without reading it again. An older read is not trusted
        (the person may have changed something there since), and None means: read it."""
        state = job.extra.target_state
        if state is None or utcnow() - (job.extra.state_read_at or 0.0) > STATE_FRESH_SECONDS:
            return None
        return state


class PreferenceWriter:
    """Writes one of a person's preferences (a "person" field) on a target: reads their
    UserConfiguration there, changes only that field, and sends the whole object back — the
    POST replaces it, so a field left out would fall back to its default, and OrderedViews,
    GroupedFolders, MyMediaExcludes and LatestItemsExcludes hold that server's own library ids:
    they are sent back exactly as read. State-based: only what differs is written, and the same
    write twice is harmless. No webhook reports it, so there is no echo to expect."""

    def __init__(
        self, config: Config, store: Store, library: Library, clients: dict[str, JellyfinClient]
    ):
        self.config = config
        self.store = store
        self.library = library
        self.clients = clients

    def apply(self, job: Job, current: dict) -> Outcome:
        """One job; ``current`` is the target's UserConfiguration, read once for the group."""
        client = self.clients[job.target]
        entry = synced(job.field)
        capability, why_not = entry.needs
        if capability and not getattr(client.ensure_version(), capability):
            raise SyncError(why_not)
        user_id = self.library.user_id(job.target, job.user_key)
        if user_id is None:
            raise SyncError(f"no user named {job.username!r} on {job.target}")
        known = self.store.get_state(job.target, job.user_key, PERSON_ITEM)
        if job.field in known and known[job.field][1] > job.observed_at:
            return Outcome("stale", "a newer change is already there")
        if not current:
            current.update(client.user_configuration(user_id))
        have, want = entry.read(current), job.value
        observed = {job.field: job.observed_at}
        if job.extra.is_undo and have != job.extra.expect and have != want:
            return Outcome(
                "skipped",
                f"not undone: {job.target} now holds {entry.label} {describe(job.field, have)}, "
                "changed "
                f"since we wrote {describe(job.field, job.extra.expect)}",
            )
        if have == want:
            rows = self.store.state_rows(
                job.target, job.user_key, PERSON_ITEM, {job.field: have}, observed
            )
            return Outcome("noop", old=describe(job.field, have), states=rows)
        if self.config.sync.dry_run:
            return Outcome("dry_run", new=describe(job.field, want))
        body = entry.write(current, want)
        client.save_user_configuration(user_id, body)
        current.clear()
        current.update(body)  # what the target holds now, for the group's next job
        # Recorded with the outcome, after the write: a comparison in between sees the job
        # running (Store.changes_on_the_way) and leaves this field alone.
        rows = self.store.state_rows(
            job.target, job.user_key, PERSON_ITEM, {job.field: want}, observed
        )
        log.info(
            "%s: %s ✓ %s: %s → %s (from %s)",
            job.target,
            job.username,
            entry.label,
            describe(job.field, have),
            describe(job.field, want),
            job.source,
        )
        return Outcome(
            "ok",
            old=describe(job.field, have),
            new=describe(job.field, want),
            states=rows,
            item_id=PERSON_ITEM,
            before={job.field: have},
            after={job.field: want},
        )


class AccountWriter:
    """Creates, deletes and renames accounts on a target, as another server's user events say."""

    def __init__(
        self, config: Config, store: Store, library: Library, clients: dict[str, JellyfinClient]
    ):
        self.config = config
        self.store = store
        self.library = library
        self.clients = clients

    def apply(self, job: Job) -> Outcome:
        key = self.config.name_on(job.user_key, job.target)
        self.library.refresh_users(job.target)  # a user event: the one time the index is re-read
        row = self.library.user(job.target, key, refresh_on_miss=False)
        if self.config.sync.dry_run:
            return Outcome("dry_run", new=job.field)
        apply = {
            "user_create": self._create,
            "user_delete": self._delete,
            "user_rename": self._rename,
        }.get(job.field)
        if apply is None:
            raise SyncError(f"{job.field!r} is no account change")  # never a guess (issue 24)
        return apply(job, row)

    def _create(self, job: Job, row: UserRow | None) -> Outcome:
        if row is not None:
            return Outcome("noop", "already exists")
        target, client = job.target, self.clients[job.target]
        name = self.config.mapped_name(job.user_key, target) or job.value["name"]
        mode = "none" if client.server.passwordless else self.config.users.new_user_password
        password = secrets.token_urlsafe(15) if mode == "random" else None
        dto = client.create_user(name, password)
        if mode == "disabled" and dto.get("Id"):
            client.disable_user(dto)
        if password:
            self.store.add_password(target, name, password)  # never logged, shown once
        self.library.refresh_users(target)
        how = {
            "none": "no password (passwordless server)",
            "random": "a generated password: collect it from /api/users/passwords",
            "disabled": "disabled until an administrator sets a password",
        }[mode]
        log.info("%s: created user %s, %s (from %s)", target, name, how, job.source)
        return Outcome("ok", how, new="created")

    def _delete(self, job: Job, row: UserRow | None) -> Outcome:
        if row is None:
            return Outcome("noop", "already gone")
        if row.is_admin:
            raise SyncError(
                f"{row.name} is an administrator on {job.target}: never deleted automatically"
            )
        try:
            self.clients[job.target].delete_user(row.user_id)
        except JellyfinError as e:
            if e.status != 404:
                raise
        self.library.refresh_users(job.target)
        log.info("%s: deleted user %s (deleted on %s)", job.target, row.name, job.source)
        return Outcome("ok", new="deleted")

    def _rename(self, job: Job, row: UserRow | None) -> Outcome:
        value = job.value
        if not value.get("old"):
            raise SyncError(
                f"renamed to {value['name']!r} on {job.source}, but the old name is unknown; "
                "rename by hand"
            )
        if row is None:
            raise SyncError(f"no user named {value['old']!r} on {job.target}")
        if row.name == value["name"]:
            return Outcome("noop", "already has that name")
        # Our own rename comes back as UserUpdated from the target: record the new name first.
        self.store.rename_user(job.target, row.user_id, value["name"])
        self.clients[job.target].rename_user(row.user_id, value["name"])
        log.info(
            "%s: renamed user %s to %s (from %s)", job.target, row.name, value["name"], job.source
        )
        return Outcome("ok", old=row.name, new=value["name"])


class PluginSetup:
    """Adds or updates our own Generic destination in a server's Webhook plugin (the step where
    most setups go wrong), leaving every other destination as it is. Idempotent: nothing is
    written when ours already says what it should."""

    def __init__(self, config: Config, clients: dict[str, JellyfinClient]):
        self.config = config
        self.clients = clients

    def run(self, server: str, base_url: str) -> tuple[str, str]:
        """("added" | "updated" | "unchanged" | "error", what to tell the person)."""
        client = self.clients[server]
        url = f"{base_url.rstrip('/')}/webhook/{server}"
        try:
            plugin = client.webhook_plugin_config()
        except JellyfinError as e:
            if e.status == 404:
                return "error", (
                    f"{server}: the Webhook plugin is not installed. In Jellyfin: Dashboard → "
                    "Plugins → "
                    "Catalog → Webhook → Install, restart Jellyfin, then try again."
                )
            return (
                "error",
                f"{server}: cannot read the Webhook plugin's settings ({e}); is the API key an "
                "administrator's?",
            )
        destinations = list(plugin.get("GenericOptions") or [])
        ours = self.destination(server, url)
        index = next(
            (
                i
                for i, d in enumerate(destinations)
                if d.get("WebhookName") == WEBHOOK_DESTINATION or d.get("WebhookUri") == url
            ),
            None,
        )
        if index is not None and all(destinations[index].get(k) == v for k, v in ours.items()):
            return "unchanged", f"{server}: the Webhook plugin already posts to {url}"
        verb = "added" if index is None else "updated"
        if index is None:
            destinations.append(ours)
        else:
            destinations[index] = {**destinations[index], **ours}
        try:
            client.save_webhook_plugin_config({**plugin, "GenericOptions": destinations})
        except JellyfinError as e:
            return "error", f"{server}: the Webhook plugin's settings could not be saved ({e})"
        log.info("%s: Webhook plugin destination %s: posts to %s", server, verb, url)
        return verb, f"{server}: Webhook plugin destination {verb}: posts to {url}"

    def destination(self, server: str, url: str) -> dict:
        token = self.config.webhook_token_for(server)
        return {
            "WebhookName": WEBHOOK_DESTINATION,
            "WebhookUri": url,
            "NotificationTypes": list(WEBHOOK_NOTIFICATIONS),
            "EnableMovies": True,
            "EnableEpisodes": True,
            # Hearts and ratings on shows, seasons and albums travel too (issue 26); marking one
            # played sends an event per episode or song, none for itself (Folder.MarkPlayed).
            "EnableSeries": True,
            "EnableSeasons": True,
            "EnableAlbums": True,
            "EnableSongs": True,
            "EnableVideos": True,
            "SendAllProperties": True,
            "TrimWhitespace": False,
            "SkipEmptyMessageBody": False,
            "EnableWebhook": True,
            "Template": "",
            "UserFilter": [],
            "Headers": [{"Key": "X-Webhook-Token", "Value": token}] if token else [],
            "Fields": [],
        }


def refused_hint(e: Exception) -> str:
    """What --check-config and the setup page's "Test" add to a server's error when the API key
    is the cause."""
    refused = isinstance(e, JellyfinError) and e.status == 401
    return " — the API key was refused" if refused else ""


def refused_or(e: JellyfinError) -> str:
    """A server's error as people should read it: 401/403 means our API key, nothing else."""
    if e.status in (401, 403):
        return f"the API key was refused (HTTP {e.status}): check servers.api_key"
    return str(e)


class ServerHealth:
    """Whether each server answers and accepts our API key, its version and latency, as the
    last check found them. ``healthy``: it answers and takes the key — only then are writes
    to it attempted; what is owed to it meanwhile waits (Syncer._error)."""

    def __init__(self, clients: dict[str, JellyfinClient]):
        self.clients = clients
        self.state: dict[str, dict] = {
            name: {
                "reachable": None,
                "healthy": None,
                "key_refused": False,
                "error": None,
                "version": None,
                "checked_at": None,
                "checked_mono": 0.0,
                "latency_ms": None,
                "down_since": None,
            }
            for name in clients
        }

    def check(self, name: str) -> dict:
        client = self.clients[name]
        started = time.monotonic()
        state = self.state[name]
        was = state["reachable"]
        try:
            info = client.info()
            state.update(
                reachable=True,
                version=info.get("Version"),
                latency_ms=round((time.monotonic() - started) * 1000, 1),
            )
            if was is False:
                log.info("%s: answers again", name)
            # /System/Info/Public answers without a key: a refused key shows only on a call
            # that needs one. GET /Users is the cheapest every version has (docs/jellyfin.md §2).
            client.users()
            if state.get("key_refused"):
                log.warning("%s: the API key is accepted again", name)
            state.update(healthy=True, key_refused=False, error=None, down_since=None)
        except JellyfinError as e:
            refused = e.status in (401, 403)
            if refused and not state.get(
                "key_refused"
            ):  # said once, when it starts: the log shows it
                log.warning(
                    "%s: %s — nothing is written there until it is fixed", name, refused_or(e)
                )
            state.update(healthy=False, key_refused=refused, error=refused_or(e))
            if not refused:
                if was is not False:  # said once, when it starts (and at start): the card keeps it
                    # The error's own text starts with the server's name: "home: GET …: cannot
                    # connect".
                    log.warning("%s — what is owed to it waits until it answers", e)
                state.update(reachable=False, latency_ms=None)
                # re-detect it when the server comes back (it may be upgraded)
                client.forget_version()
            state["down_since"] = state["down_since"] or utcnow()
        state["checked_at"] = utcnow()
        state["checked_mono"] = time.monotonic()
        return state


class Counters:
    """What /metrics counts: events by key ("webhooks|server|type", "sync|target|result") and
    the delay from a change being queued to its write, per target (a histogram)."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._delays: dict[str, list] = {}  # target → [count per bucket, sum, count]
        self._lock = threading.Lock()  # guards both

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def record_delay(self, target: str, seconds: float) -> None:
        with self._lock:
            # Per bucket (the last one: above every bound), not cumulative; then sum and count.
            hist = self._delays.setdefault(target, [[0] * (len(DELAY_BUCKETS) + 1), 0.0, 0])
            hist[0][bisect.bisect_left(DELAY_BUCKETS, seconds)] += 1
            hist[1] += seconds
            hist[2] += 1

    def delays(self) -> dict[str, tuple[list[int], float, int]]:
        """target → (count per bucket, the last above every bound; sum of seconds; count)."""
        with self._lock:
            return {t: (list(h[0]), h[1], h[2]) for t, h in self._delays.items()}


# ── Threads ──────────────────────────────────────────────────────────────────


class SupervisedThread:
    """A named daemon thread that its owner (the Service's supervisor) starts again if it dies.

    A thread should never die: each catches its own errors. If one does anyway (a bug), it is
    logged, shown by /readyz, and restarted after a pause that grows with each death (1 s, 2 s,
    4 s … up to a minute), so a thread that dies at once is not restarted in a tight loop.
    """

    def __init__(self, name: str, target: Any):
        self.name = name
        self.target = target
        self.thread: threading.Thread | None = None
        self.restarts = 0
        self._restart_at = 0.0  # monotonic time before which it is not restarted again

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.target()
        except BaseException:
            log.exception("thread %s died", self.name)

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def join(self, timeout: float) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    def revive(self) -> bool:
        """Start it again if it died and its pause is over; True if it was restarted."""
        now = time.monotonic()
        if self.alive() or now < self._restart_at:
            return False
        self.restarts += 1
        self._restart_at = now + min(2.0 ** (self.restarts - 1), 60.0)
        log.error("thread %s had stopped: restarted (restart %d)", self.name, self.restarts)
        self.start()
        return True


# ── Syncer ───────────────────────────────────────────────────────────────────


class Syncer:
    """Webhook → inbox → jobs → writes, and the threads that move them: it takes webhooks in,
    hands them to the Planner, and gives each target's jobs to the writers (WatchStateWriter,
    AccountWriter), recording each outcome in one place (_record)."""

    def __init__(
        self, config: Config, store: Store, library: Library, clients: dict[str, JellyfinClient]
    ):
        self.config = config
        self.store = store
        self.library = library
        self.clients = clients
        self.planner = Planner(config, store)
        self.stop_event = threading.Event()
        self._wake = threading.Condition()  # guards nothing; planner waits on it for new events
        # Set (under _wake) by the planner *before* it looks for unplanned rows and sleeps: a
        # webhook committed after that look sees it set and wakes the planner; one committed
        # before it is found by the look. While the planner is busy nobody takes the lock.
        self._planner_may_sleep = False
        # The planner's last failure, until a batch plans again: readiness and the dashboard
        # say so at once, not only when the oldest unplanned webhook is a minute old.
        self.planner_error: str | None = None
        self._target_wake = {s.name: threading.Condition() for s in config.servers}
        self.server_health = ServerHealth(clients)
        self._resolve_looked: dict[str, float] = {}  # target → when resolve_failed last looked
        self.health = self.server_health.state  # server → its last check (for the Web)
        self.counters = Counters()
        self.writer = WatchStateWriter(config, store, library, clients)
        self.accounts = AccountWriter(config, store, library, clients)
        self.preferences = PreferenceWriter(config, store, library, clients)
        self.threads: list[SupervisedThread] = []
        # Item 4 of the silent-plugin warning: when each server last posted any webhook we took
        # (in memory: a restart starts the count afresh), and when RecentCheck found changes
        # there that no webhook had brought.
        self.webhook_seen: dict[str, float] = {}
        self.unbrought: dict[str, collections.deque] = {
            s.name: collections.deque(maxlen=4 * SILENT_FINDS) for s in config.servers
        }

    def silent_plugin(self, server: str) -> str | None:
        """What to tell a person when ``server``'s Webhook plugin seems not to post to us: the
        recent check found changes there SILENT_FINDS times within SILENT_WINDOW and no webhook
        came from it since the first of them. None otherwise (a webhook clears it at once)."""
        now = utcnow()
        since = max(now - SILENT_WINDOW, self.webhook_seen.get(server, 0.0))
        finds = [t for t in self.unbrought.get(server, ()) if t > since]
        if len(finds) < SILENT_FINDS:
            return None
        base = (
            self.config.public_url.rstrip("/")
            if self.config.public_url
            else "http://<this service>"
        )
        return (
            f"{SILENT_WORDS.format(server=server)}: {len(finds)} checks in the last "
            f"{SILENT_WINDOW / 60:.0f} minutes found changes there that no webhook brought (they "
            "were "
            f"synced by the check, within a minute or two). On {server}, check: the Webhook plugin "
            "is "
            "installed (Dashboard → Plugins); its Generic destination's URL is "
            f"{base}/webhook/{server}; "
            "“Send All Properties” is ticked; the notification types Playback Progress, Playback "
            "Stop "
            "and User Data Saved are ticked; and the destination is enabled. “Set up webhooks” on "
            "this card does it for you"
        )

    # ingest (called by Web, in the request thread)
    def accept_webhook(self, server: str, body: bytes) -> dict:
        """Validate, commit one row, and wake the planner. No network call happens here."""
        if self.config.server(server) is None:
            raise WebhookError(
                f"unknown server {server!r}: the URL must be /webhook/<name from config>", 404
            )
        data = parse_webhook(body)
        ntype = data["NotificationType"]
        # Only the plugin's own types become metric labels: a sender must not grow them at will.
        self.counters.count(
            f"webhooks|{server}|{ntype if ntype in NOTIFICATION_TYPES else 'other'}"
        )
        self.webhook_seen[server] = utcnow()  # the plugin posts to us (whatever the type)
        if ntype not in ACTED_ON or (ntype == "PlaybackStart"):
            return {"status": "ignored", "reason": f"{ntype} needs no sync"}
        event_id = self.store.add_event(server, ntype, _compact_json(data))
        if self._planner_may_sleep:
            self.wake_planner()
        return {"status": "queued", "event_id": event_id}

    # planning
    def plan_pending(self) -> int:
        """Turn unplanned inbox rows into jobs. Returns how many rows were planned (or failed).

        Each row is a unit of work of its own: one that cannot be read or planned is marked
        failed with its error (shown with the failed changes, retryable and discardable) and
        the rows behind it go on. Only a database that cannot be written (locked, full) stops
        the batch: that is not the row's fault, and the next try plans it again.
        """
        rows = self.store.unplanned_events()
        if not rows:
            return 0
        failures: list[tuple[InboxRow, str]] = []
        parsed = self._parse_rows(rows, failures)
        keep = self._newest_progress(parsed)
        planned: list[tuple[int, list[Observation]]] = []
        woken: set[str] = set()
        for i, (row, ev, observed) in enumerate(parsed):
            if ev["NotificationType"] == "PlaybackProgress" and i not in keep:
                planned.append((row.id, []))
                continue
            try:
                obs, woke = self._plan_one(row, ev, observed)
            except StoreBusy:
                raise
            except Exception as e:
                failures.append((row, _error_text(e)))
                continue
            woken.update(woke)
            planned.append((row.id, obs))
        jobs_for = self._queue_planned(planned, {row.id: row for row in rows}, failures)
        if failures:
            self.store.fail_events(failures)
            for row, error in failures:
                log.error(
                    "webhook #%d from %s (%s) cannot be planned: %s",
                    row.id,
                    row.server,
                    row.event,
                    error,
                )
            self.counters.count("events_failed", len(failures))
        for t in woken.union(jobs_for):
            self.wake_target(t)
        return len(rows)

    def _parse_rows(
        self, rows: list[InboxRow], failures: list
    ) -> list[tuple[InboxRow, dict, float]]:
        """(row, its body, when its change was observed); a row that cannot be read goes to
        failures."""
        parsed = []
        for row in rows:
            try:
                ev = json.loads(row.body)
                observed = self.planner.observed_at(
                    row.server, ev.get("UtcTimestamp"), row.received_at
                )
            except Exception as e:  # stored before the checks at the door existed, say
                failures.append((row, _error_text(e)))
                continue
            parsed.append((row, ev, observed))
        return parsed

    @staticmethod
    def _newest_progress(parsed: list[tuple[InboxRow, dict, float]]) -> set[int]:
        """A player reports every second: of a batch's reports for one item, only the newest
        position can matter (the others would be coalesced away or be stale), so the others
        are marked planned without further work. During a flood this is most of them."""
        newest: dict[tuple, int] = {}  # (server, user, item) → index of its newest report
        for i, (row, ev, observed) in enumerate(parsed):
            if ev["NotificationType"] == "PlaybackProgress":
                key = (row.server, ev.get("NotificationUsername"), ev.get("ItemId"))
                if key not in newest or parsed[newest[key]][2] <= observed:
                    newest[key] = i
        return set(newest.values())

    def _queue_planned(
        self, planned: list[tuple[int, list[Observation]]], rows: dict, failures: list
    ) -> list[str]:
        """Hand the batch to the Planner in one transaction; if something in it cannot be stored,
        row by row, so only that row fails. Returns the targets that got jobs."""
        try:
            jobs_for, dropped = self.planner.plan(planned)
        except StoreBusy:
            raise
        except Exception:
            jobs_for, dropped = [], 0
            for entry in planned:
                try:
                    targets, n = self.planner.plan([entry])
                except StoreBusy:
                    raise
                except Exception as e:
                    failures.append((rows[entry[0]], _error_text(e)))
                    continue
                jobs_for += targets
                dropped += n
        self.counters.count("observations_dropped", dropped)
        return jobs_for

    def _plan_one(
        self, row: InboxRow, ev: dict, observed: float
    ) -> tuple[list[Observation], list[str]]:
        """(observations, targets to wake for other reasons) for one inbox row, its parsed body
        and the time its change was observed."""
        server = row.server
        ntype = ev["NotificationType"]
        if ntype in ("ItemAdded", "ItemDeleted"):
            if ntype == "ItemDeleted":
                self.store.delete_item(server, ev["ItemId"])
            self.library.mark_stale(server)
            woke = self.store.wake_waiting(server) if ntype == "ItemAdded" else 0
            return [], [server] if woke else []
        if ntype in USER_EVENTS:
            return [
                dataclasses.replace(o, cause=f"event:{row.id}")
                for o in self._account_change(server, ev)
            ], []
        if ntype == MIGRATED_EVENT:  # Older program
            return older_owed(self.config, server, ev, observed), []  # Older program
        return self._observations(row, ev, observed), []

    def _observations(self, row: InboxRow, ev: dict, observed: float) -> list[Observation]:
        """What a watch-state webhook reports, one Observation per field we sync."""
        server, ntype, username = row.server, ev["NotificationType"], ev["NotificationUsername"]
        key = self.config.person(server, username)
        if not self.config.user_synced(key):
            return []
        last_played = parse_time(ev.get("LastPlayedDate"))
        if last_played:
            last_played = self.planner.not_ahead(
                server, "LastPlayedDate", last_played, row.received_at
            )
        extra = Carried(
            event=ntype,
            runtime=ev.get("RunTimeTicks"),
            play_count=ev.get("PlayCount"),
            last_played=last_played,
        )
        others = tuple(s.name for s in self.config.servers if s.name != server)
        debounce = self.config.sync.progress_debounce_seconds
        return [
            Observation(
                server=server,
                user_key=key,
                username=username,
                item_id=ev["ItemId"],
                item_name=event_item_name(ev),
                field=fld,
                value=value,
                observed_at=observed,
                targets=others,
                extra=extra,
                delay=debounce if REGISTRY[fld].debounced and ntype != "PlaybackStop" else 0.0,
                cause=f"event:{row.id}",
            )
            for fld, value in observations_from_event(ev).items()
            if self.config.syncs(fld)
        ]

    def _account_change(self, server: str, ev: dict) -> list[Observation]:
        """A user created, deleted or renamed on ``server``: one order per other server."""
        ntype, username = ev["NotificationType"], ev["NotificationUsername"]
        value: dict[str, Any] = {"name": username}
        field = {
            "UserCreated": "user_create",
            "UserDeleted": "user_delete",
            "UserUpdated": "user_rename",
        }[ntype]
        person = self.config.person(server, username)
        if ntype == "UserUpdated":
            # The webhook carries only the new name: the old one comes from our index, read
            # before it is refreshed. Unknown → the job reports it; we never guess.
            old = self.store.user_by_id(server, ev["UserId"]) if ev.get("UserId") else None
            if old is not None and name_key(old.name) == name_key(username):
                return []  # not a rename (another kind of update, or the echo of ours)
            value["old"] = old.name if old is not None else None
            if old is not None:
                person = self.config.person(server, old.name)
        self.library.forget_users(server)
        if not self.config.syncs(field) or not self.config.user_synced(person):
            return []
        others = tuple(s.name for s in self.config.servers if s.name != server)
        return [
            Observation(
                server=server,
                user_key=person,
                username=username,
                item_id="-",
                item_name=f"user {username}",
                field=field,
                value=value,
                observed_at=utcnow(),
                targets=others,
                extra=Carried(event=ntype),
                kind="order",
            )
        ]

    def wake_target(self, target: str) -> None:
        cond = self._target_wake[target]
        with cond:
            cond.notify_all()  # every writer of that server: there may be work for each

    # applying
    def apply_next(self, target: str) -> bool:
        """Claim and apply the next due jobs for ``target``, and record their outcomes in one
        commit. Returns False when none was due. (Should the process die before that commit,
        the jobs are found 'running' at start and applied again: harmless, docs/design.md §2,
        §5.)"""
        groups = self.store.claim_jobs(target, utcnow())
        finished: list = []
        try:
            for jobs in groups:
                # Played first: marking played resets the position, which a position job may then
                # set.
                jobs.sort(key=lambda j: FIELD_ORDER.get(j.field, -1))
                for job, outcome in self._apply_group(target, jobs):
                    row = self._record(job, outcome)
                    if row is not None:
                        finished.append(row)
        finally:
            if finished:
                self.store.finish_jobs(finished)
        return bool(groups)

    def _apply_group(self, target: str, jobs: list[Job]) -> list[tuple[Job, Outcome]]:
        """The outcome of each job for one user and item on ``target``."""
        if jobs[0].source_item_id == PERSON_ITEM:
            # Accounts and preferences (no item): one person's, from one source. Each job by its
            # own scope: a claim groups them by person and item, and both use PERSON_ITEM.
            current: dict = {}  # the target's UserConfiguration, read once for the preferences
            return [
                (job, self._attempt(job, lambda job=job: self._apply_personal(job, current)))
                for job in jobs
            ]
        try:
            user_id, src_item, item = self.writer.resolve(target, jobs)
        except Exception as e:
            return [(job, self._error(job, e)) for job in jobs]
        if item is None:
            return [(job, self._absent(job, src_item)) for job in jobs]
        # the target's UserItemDataDto, read once for the whole group (see _KNOWN)
        current: dict = {}
        return [
            (
                job,
                self._attempt(job, lambda job=job: self.writer.apply(job, user_id, item, current)),
            )
            for job in jobs
        ]

    def _apply_personal(self, job: Job, current: dict) -> Outcome:
        if synced(job.field).scope == "person":
            return self.preferences.apply(job, current)
        return self.accounts.apply(job)

    def _attempt(self, job: Job, apply: Any) -> Outcome:
        try:
            return apply()
        except Exception as e:
            return self._error(job, e)

    def _error(self, job: Job, e: Exception) -> Outcome:
        """Network and 5xx: retried with growing pauses — unless the target does not answer
        (or refuses our API key) now: then nothing is its fault, and it waits for the server
        without using up its retries (check_server wakes it). What we cannot do: skipped,
        with why. A bug: the job is kept and shown (retried, then failed); the worker carries on."""
        if isinstance(e, JellyfinError):
            if (e.retryable or e.status in (401, 403)) and not self._target_healthy(job.target):
                return Outcome("unreachable", str(e))
            return self._retry_or_fail(job, str(e), e.retryable)
        if isinstance(e, SyncError):
            return Outcome("skipped", str(e))
        log.error("%s: job %d crashed", job.target, job.id, exc_info=e)
        return self._retry_or_fail(job, f"internal error: {type(e).__name__}: {e}", True)

    def _retry_or_fail(self, job: Job, error: str, retryable: bool) -> Outcome:
        attempts = job.attempts + 1
        if retryable and attempts <= self.config.sync.max_retries:
            delay = min(self.config.sync.retry_base_seconds * 2 ** (attempts - 1), MAX_RETRY_DELAY)
            return Outcome("retry", error, due_at=utcnow() + delay)
        return Outcome("failed", error)

    def _target_healthy(self, target: str) -> bool:
        """Does ``target`` answer and take our key, now that a request to it failed? A recent
        check that found it down is trusted (during an outage every job of a claim fails alike:
        one check serves them); one that found it well is older than the failure: checked again."""
        state = self.health[target]
        if (
            state["healthy"] is not False
            or time.monotonic() - state["checked_mono"] > SERVER_CONFIRM_SECONDS
        ):
            state = self.check_server(target)
        return bool(state["healthy"])

    def _absent(self, job: Job, src_item: ItemInfo) -> Outcome:
        """The item is not on the target (yet): wait, let it be, or give up, as the Planner says."""
        result, due, msg = self.planner.when_absent(job, src_item.path_key)
        return Outcome(result, msg, due_at=due)

    def _record(self, job: Job, o: Outcome) -> Finished | None:
        """The one place a job's outcome is recorded: its log line and counters now; its row,
        its journal entry and what the target now holds are returned, for Store.finish_jobs to
        commit with the claim's other outcomes (None: rescheduled here)."""
        target = job.target
        if o.result == "unreachable":
            self.store.reschedule_job(job, "unreachable", utcnow(), o.detail or "", attempt=False)
            log.info("%s: waits for the server: %s", target, o.detail)
            return
        if o.result in ("retry", "waiting"):
            self.store.reschedule_job(
                job,
                "pending" if o.result == "retry" else "waiting",
                o.due_at,
                o.detail or "",
                absent=o.result == "waiting",
            )
            if o.result == "retry":
                log.info(
                    "%s: retry %d/%d in %.0fs: %s",
                    target,
                    job.attempts + 1,
                    self.config.sync.max_retries,
                    o.due_at - utcnow(),
                    o.detail,
                )
            return
        log_row = LogRow(o.result, o.old, o.new, o.detail, o.item_id, o.before, o.after)
        self.counters.count(f"sync|{target}|{o.result}")
        if o.done:
            if o.result == "ok" and job.queued_at:
                self.counters.record_delay(target, utcnow() - job.queued_at)
            return Finished(job, "done", None, log_row, o.states, self._undo_mark(job, o))
        if o.result == "absent":
            # Not on that server and nobody said to wait for it: finished, and no failure (it
            # is neither listed with the waiting and failed changes nor counted with them).
            log.info("%s: %s %s", target, job.username, o.detail)
            return Finished(job, "absent", o.detail, log_row)
        # skipped, failed
        log.warning("%s: %s %s %s: %s", target, job.username, job.item_name, o.result, o.detail)
        return Finished(job, "failed" if o.result == "failed" else "skipped", o.detail, log_row)

    @staticmethod
    def _undo_mark(job: Job, o: Outcome) -> tuple[str, str] | None:
        """What a job that holds on its target does to the undo marks (class Undo): an undo's
        order is remembered ("put"); a change of the person's ends the undo there ("clear")."""
        item_id = o.item_id or (o.states[0][2] if o.states else None)
        if (
            o.result not in ("ok", "noop")
            or not item_id
            or REGISTRY[job.field].scope not in ("item", "person")
        ):
            return None
        return ("put" if job.extra.is_undo else "clear", item_id)

    # health
    def check_server(self, name: str) -> dict:
        """Check a server; if it answers and takes our key, what waited for it is due now,
        however long it was away."""
        state = self.server_health.check(name)
        if state["healthy"] and self.store.wake_unreachable(name):
            log.info("%s: the changes that waited for it go now", name)
            self.wake_target(name)
        return state

    def resolve_failed(self, target: str) -> int:
        """Failed changes for ``target`` that the target now holds anyway (a later write, a
        pass, the person) are marked resolved: read from the server, never assumed. Looked at
        only when some change was applied since the last look (any of these leaves one), so
        failed changes that stay failed are not read again every check. Returns how many."""
        since, self._resolve_looked[target] = self._resolve_looked.get(target, 0.0), utcnow()
        if not self.store.done_since(since):
            return 0
        resolved = []
        for job in self.store.failed_jobs(target, RESOLVE_BATCH):
            try:
                user_id = self.library.user_id(target, job.user_key)
                if job.source_item_id == PERSON_ITEM:  # a preference (accounts are not looked at)
                    entry = synced(job.field)
                    mine = entry.scope == "person" and user_id
                    if (
                        mine
                        and entry.read(self.clients[target].user_configuration(user_id))
                        == job.value
                    ):
                        resolved.append(job.id)
                    continue
                src = self.store.get_item(job.source, job.source_item_id)
                item = self.library.lookup(src, target) if user_id and src else None
                if item is None:
                    continue
                have = read_fields(self.clients[target].user_data(user_id, item.item_id))
            except JellyfinError:
                return len(resolved)  # the server went away: the next check looks again
            except SyncError:
                continue
            want = synced(job.field).on_target(job.value, job.extra.runtime, item.runtime)
            if have.get(job.field) == want:
                resolved.append(job.id)
        if resolved:
            self.store.mark_resolved(resolved)
            log.info("%s: %d failed change(s) now hold there: resolved", target, len(resolved))
        return len(resolved)

    # threads
    def start(self) -> None:
        self.stop_event.clear()
        self.threads = [
            SupervisedThread("planner", self._planner_loop),
            SupervisedThread("upkeep", self._upkeep_loop),
        ]
        for s in self.config.servers:
            # Each writer has its own connection (JellyfinClient keeps one per thread).
            for i in range(1, self.config.sync.write_connections + 1):
                name = f"worker-{s.name}" + (f"-{i}" if i > 1 else "")
                self.threads.append(
                    SupervisedThread(name, functools.partial(self._target_loop, s.name))
                )
        for t in self.threads:
            t.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        self.wake_planner(everyone=True)
        for t in self._target_wake:
            self.wake_target(t)
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def alive(self) -> bool:
        return bool(self.threads) and not self.dead_threads()

    def dead_threads(self) -> list[str]:
        return [t.name for t in self.threads if not t.alive()]

    def wake_planner(self, everyone: bool = False) -> None:
        with self._wake:
            self._wake.notify_all() if everyone else self._wake.notify()

    def _planner_loop(self) -> None:
        # Everything the planner writes is derived from the inbox, in the same transaction that
        # marks the rows planned: if a power cut undoes its last commits, the rows are simply
        # planned again. So its commits need not wait for an fsync (WAL keeps them in order),
        # and the webhooks' own fsyncs do not queue behind the planner's.
        self.store.relax_durability()
        interval = self.config.sync.worker_interval_seconds or 5.0
        pause = 1.0  # after a database error: doubled each time it fails again, up to a minute
        while not self.stop_event.is_set():
            try:
                self.store.yield_to_intake()
                planned = self.plan_pending()
                if planned >= PLANNER_BURST_ROWS:
                    # A burst is on: let the next batch grow for a moment. A batch's fixed cost
                    # (its SELECT and transaction, in Python under the GIL the request threads
                    # need) is then shared by dozens of webhooks rather than a handful. Single
                    # events still plan at once.
                    self.stop_event.wait(PLANNER_BURST_PAUSE)
                pause = 1.0
                self.planner_error = None
                if planned:
                    continue
            except Exception as e:
                # Rows that cannot be planned are marked failed by plan_pending; what gets here
                # is the database itself (locked, full, read-only), which a later try may find
                # mended.
                self.planner_error = _error_text(e)
                log.error("planner: %s; trying again in %.0f s", self.planner_error, pause)
                self.stop_event.wait(pause)
                pause = min(pause * 2, 60.0)
                continue
            with self._wake:
                self._planner_may_sleep = True
                if self.store.count_unplanned() == 0 and not self.stop_event.is_set():
                    self._wake.wait(interval)
                self._planner_may_sleep = False

    def _upkeep_loop(self) -> None:
        """What no webhook drives: old history pruned (retention), and each server checked on
        its own schedule — every HEALTH_CHECK_SECONDS while it answers, sooner while it does not
        (counted from the last check, whoever made it: a failed write that found the server
        down brings the next one near). The check that finds a server back wakes what waited for
        it; a healthy one gets its users and item index ready and its resolved failures marked."""
        self.store.relax_durability()
        interval = self.config.sync.worker_interval_seconds or 5.0
        recheck = min(interval, HEALTH_RECHECK_SECONDS)
        next_prune = 0.0
        while not self.stop_event.is_set():
            if time.monotonic() >= next_prune:
                self.store.prune(utcnow() - ECHO_EXPECTATION_SECONDS)
                pruned = self.store.prune_history(utcnow() - self.config.retention_days * DAY)
                if pruned:
                    log.debug("retention: %d old rows removed", pruned)
                next_prune = time.monotonic() + PRUNE_EVERY_SECONDS
            for s in self.config.servers:
                health = self.health[s.name]
                every = HEALTH_CHECK_SECONDS if health["healthy"] else recheck
                if (
                    not self.stop_event.is_set()
                    and time.monotonic() >= health["checked_mono"] + every
                ):
                    self._check_and_prepare(s.name)
            # A writer's check may bring a server's next one nearer: look again at least this often.
            self.stop_event.wait(recheck)

    def _check_and_prepare(self, target: str) -> None:
        if not self.check_server(target)["healthy"]:
            return
        try:
            self.library.ensure_users(target)
            self.library.ensure_index(target)
            self.resolve_failed(target)
        except JellyfinError as e:
            log.warning("%s: cannot build the item index yet: %s", target, e)

    def _target_loop(self, target: str) -> None:
        # What a writer commits (claims, outcomes, the state it wrote) is safe to lose in a power
        # cut: a job found 'running' at start is applied again, and jobs carry state, not deltas
        # (docs/design.md §2, §5). Like the planner's, its commits need not wait for an fsync.
        self.store.relax_durability()
        cond = self._target_wake[target]
        interval = self.config.sync.worker_interval_seconds or 5.0
        pause = 1.0  # after an error outside any one job: doubled each time, up to a minute
        while not self.stop_event.is_set():
            try:
                self.store.yield_to_intake()
                if self.apply_next(target):
                    pause = 1.0
                    continue
            except Exception as e:  # each job's own errors are handled in apply_next
                log.error("%s: %s; trying again in %.0f s", target, _error_text(e), pause)
                self.stop_event.wait(pause)
                pause = min(pause * 2, 60.0)
                continue
            pause = 1.0
            with cond:  # look for work under the lock wake_target() takes: no lost wake-up
                due = self.store.next_due(target)
                wait = interval if due is None else max(0.0, min(interval, due - utcnow()))
                if not self.stop_event.is_set() and wait > 0:
                    cond.wait(wait)


# ── Reconciler ───────────────────────────────────────────────────────────────

_UNKNOWN = object()  # no earlier state recorded for this server, user, item and field


@dataclass
class _View:
    """One server's side of one field of one item, for one person."""

    server: str
    item_id: str
    cur: Any
    prior: Any  # _UNKNOWN when never seen
    prior_at: float
    when: float  # when the current value was set, where Jellyfin says (LastPlayedDate), else 0
    play_count: int
    undone: bool = False  # ``cur`` is the value an undo put back here (class Undo)


def decide(field: str, views: list[_View]) -> tuple[Any, _View] | None:
    """The value every server should hold, and the server it comes from; None = leave alone.

    - changed on one server since the last agreed state → that change wins;
    - changed on several → the newest (LastPlayedDate where Jellyfin has one); a tie, or no
      date, goes to the "positive" value (played, favourite, like, the further position) — for
      a preference (not ``ranked``), to the first of them in the config's order of servers;
    - never seen before, on one server or all → union: played or favourite anywhere wins, the
      furthest resume position, a like over a dislike; nothing is ever unmarked on a first sight;
      a preference that is set beats an unset one, and different set ones are left alone;
    - no change but the servers disagree (a write that failed earlier) → the value recorded
      most recently — unless an undo put a value back on one of them: then they disagree on
      purpose, and the field is left alone until the person changes it on any server (that
      change then wins as above, on every server, the undone one included).
    "Unplayed" counts as a change only with a play count of 0: starting a re-watch also makes
    Jellyfin report Played=false, but keeps the count (docs/jellyfin.md §1, the re-watch trap).
    """

    def positive(v: _View) -> tuple:
        if not entry.ranked:
            return ()  # a preference: no value is "better"; max() keeps the first (config order)
        value = v.cur
        rank = (
            value
            if isinstance(value, int | float) and not isinstance(value, bool)
            else {True: 2, None: 1, False: 0}.get(value, 0)
        )
        return (rank,)

    entry = REGISTRY[field]

    def real(v: _View) -> bool:
        if v.prior is _UNKNOWN or v.cur == v.prior:
            return False
        # Played=false with a play count is a re-watch in progress, not "mark unplayed".
        return not (entry.rewatch_trap and v.cur is False and v.play_count > 0)

    changed = [v for v in views if real(v)]
    agree = all(v.cur == views[0].cur and type(v.cur) is type(views[0].cur) for v in views)
    if not changed and any(v.undone for v in views):
        # Neither the value the undo put back nor the one the person made where they acted is
        # "the most recent": re-applying the first or spreading the second would undo the undo.
        return None
    if changed:
        best = max(changed, key=lambda v: (v.when, positive(v)))
    elif any(v.prior is _UNKNOWN for v in views) or agree:
        if agree:
            return None
        # First sight — on any of them (a like made where no webhook ever told us of the item,
        # say, while the others are known): the field's merge (union: played or favourite
        # anywhere, the furthest position, a like over a dislike), never its "nothing" value.
        # Taking the known servers' value instead cleared that like where the person made it.
        value = functools.reduce(entry.merge, [v.cur for v in views])
        if value is _CLASH or value == entry.nothing:
            return None  # nothing to spread, or (a preference) different choices: left alone
        best = max((v for v in views if v.cur == value), key=lambda v: v.when)
    else:
        known = [v for v in views if v.prior is not _UNKNOWN]
        best = max(known, key=lambda v: (v.prior_at, positive(v)))
        if entry.rewatch_trap and best.cur is False and any(v.cur is True for v in views):
            best = next(v for v in views if v.cur is True)  # never unmark without a seen change
    return best.cur, best


def _items(n: int) -> str:
    return f"{n} item" if n == 1 else f"{n} items"


def _report_changes(report: dict, person: str, server: str, n: int, sample: str) -> None:
    """Count ``n`` changes for ``person`` on ``server`` in a pass's report (keeping 10 samples)."""
    entry = report["users"].setdefault(person, {}).setdefault(server, {"count": 0, "sample": []})
    entry["count"] += n
    report["changes"] += n
    if len(entry["sample"]) < 10:
        entry["sample"].append(sample)


class Preferences:
    """A person's language and playback preferences (the registry's "person" fields), compared
    across servers by decide() as an item's fields are: no webhook carries a settings change, so
    each pass and each RecentCheck round read every server's users (GET /Users: everyone's
    UserConfiguration in one request per server) and queue what differs as ordinary jobs.

    - changed on one server since the last agreed state → that change goes everywhere;
    - changed on several between two looks → the first of them in the config's order of servers
      (Jellyfin keeps no date for a setting; RecentCheck looks every minute, so this is rare);
    - first sight: a value that is set beats an unset or default one; where servers hold
      different set values, nothing is chosen for the person: left alone, and said once;
    - a server whose version cannot take the write (10.8) is read, never written: a change
      made there still goes to the others.
    The last agreed state is the ``state`` table's, under the item id PERSON_ITEM."""

    def __init__(self, config: Config, store: Store, library: Library, planner: Planner):
        self.config = config
        self.store = store
        self.library = library
        self.clients = library.clients
        self.planner = planner

    def fields(self) -> list[str]:
        return [f for f in PREFERENCES if self.config.syncs(f)]

    def read(self, server: str) -> dict[str, dict]:
        """{user id: UserConfiguration} of everyone on ``server``: one GET /Users. (The user
        index is not touched: a rename's old name is read from it when its webhook is planned.)"""
        return self.of_users(self.clients[server].users())

    @staticmethod
    def of_users(users: list[dict]) -> dict[str, dict]:
        """{user id: UserConfiguration} from a GET /Users answer already read."""
        return {
            normalise_id(u["Id"]): dict(u.get("Configuration") or {}) for u in users if u.get("Id")
        }

    def compare(
        self,
        person: str,
        configs: dict[str, dict],
        cause: Any,
        report: dict | None = None,
        dry_run: bool = False,
        elsewhere: tuple[str, ...] = (),
        only_news: bool = False,
    ) -> list[str]:
        """Compare one person's preferences; ``configs``: {server: their UserConfiguration},
        in the config's order. Queues what differs (``cause()`` names why) unless ``dry_run``;
        returns the targets that got jobs. ``elsewhere``: servers the person has an account on
        that could not be read now (away): a change goes to them too, and waits for them.
        ``only_news`` (RecentCheck, every minute): act on changes and first sights only; a
        disagreement with no change (a write that failed or was a dry run) is left to passes,
        so it is not queued again every minute."""
        fields = self.fields()
        if not fields or not configs or len(configs) + len(elsewhere) < 2:
            return []
        states = {srv: self.store.get_state(srv, person, PERSON_ITEM) for srv in configs}
        on_the_way = self.store.changes_on_the_way(person)
        undone = self.store.undone_of(person)
        remember: list[tuple] = []
        forget: list[tuple] = []
        apart: list[tuple] = []
        jobs: list[Observation] = []
        for field in fields:
            if any((srv, PERSON_ITEM, field) in on_the_way for srv in configs):
                continue  # a change of it is still being written: newer than what we read
            entry = REGISTRY[field]
            views = []
            for srv, cfg in configs.items():
                prior, prior_at = states[srv].get(field, (_UNKNOWN, 0.0))
                cur = entry.read(cfg)
                was_undone = undone.get((srv, PERSON_ITEM, field), _UNKNOWN) == cur
                views.append(_View(srv, PERSON_ITEM, cur, prior, prior_at, 0.0, 0, was_undone))
            decision = decide(field, views)
            differ = len({json.dumps(v.cur) for v in views}) > 1
            news = any(v.prior is _UNKNOWN or v.prior != v.cur for v in views)
            if only_news and decision is not None and not news:
                continue
            if (
                not dry_run
                and (decision is not None or not differ)
                and any(v.undone for v in views)
            ):
                forget += [(v.server, person, PERSON_ITEM, field) for v in views if v.undone]
            if decision is None:
                if differ and not any(v.undone for v in views):
                    # A first sight with different choices: none is picked for the person. The
                    # servers then differ on purpose (as after an undo) until they change one.
                    self._clash(person, entry, views, report)
                    apart += [(v.server, person, PERSON_ITEM, field, v.cur) for v in views]
                remember += self._baseline(person, field, views, None)
                continue
            desired, source = decision
            targets = [v.server for v in views if v.cur != desired]
            if any(v.prior is not _UNKNOWN and v.prior != v.cur for v in views):
                targets += elsewhere  # a change: owed to the servers away too (the writer compares)
            # 10.8: read, never written (ServerVersion.limits says so on its card).
            targets = [t for t in targets if self._writable(t)]
            remember += self._baseline(person, field, views, source, set(targets))
            for target in targets:
                if report is not None:
                    sample = f"{entry.label}: {entry.describe(desired)} (from {source.server})"
                    _report_changes(report, person, target, 1, sample)
                jobs.append(
                    Observation(
                        server=source.server,
                        user_key=person,
                        username=person,
                        item_id=PERSON_ITEM,
                        item_name=entry.label,
                        field=field,
                        value=desired,
                        observed_at=utcnow(),
                        targets=(target,),
                        extra=Carried(event="reconcile"),
                        kind="order",
                        cause="",
                    )
                )
        if dry_run:
            return []
        if remember:
            self.store.remember_states(remember)
        if forget:
            self.store.forget_undone(forget)
        if apart:
            self.store.keep_apart(apart, "clash")
        if not jobs:
            return []
        why = cause()
        return self.planner.plan([(0, [dataclasses.replace(ob, cause=why) for ob in jobs])])[0]

    def _writable(self, server: str) -> bool:
        version = self.clients[server].version  # unknown (away since start): the writer will see
        return version is None or version.writes_user_settings

    @staticmethod
    def _baseline(
        person: str,
        field: str,
        views: list[_View],
        source: _View | None,
        written: set[str] = frozenset(),
    ) -> list[tuple]:
        """What each server holds now, as the state the next look compares with. A server
        about to be ``written`` records its own with the job's outcome; one that cannot be
        written (10.8) records what it holds, so that a change made there later is seen."""
        rows = []
        for v in views:
            if (v.prior is not _UNKNOWN and v.prior == v.cur) or v.server in written:
                continue
            rows.append(
                (
                    v.server,
                    person,
                    PERSON_ITEM,
                    field,
                    v.cur,
                    utcnow() if v is source else v.prior_at,
                )
            )
        return rows

    @staticmethod
    def _clash(person: str, entry: SyncedField, views: list[_View], report: dict | None) -> None:
        """Different choices on a first sight: we never pick one for the person. Said once
        (the field is then kept apart until they change it)."""
        held = ", ".join(f"{entry.describe(v.cur)} on {v.server}" for v in views)
        text = (
            f"{person}: {entry.label} differs ({held}): left alone; "
            "change it on one server and it follows"
        )
        if report is not None:
            report.setdefault("notes", []).append(text)
        log.info("preferences: %s", text)


PASS_PAGE = 500  # items a pass compares at a time: what it holds, whatever the library's size


class Reconciler:
    """Full comparison passes: read every person's state on every server, decide per field,
    and queue the differences as ordinary jobs (so echo rules, retries and path policy apply)."""

    def __init__(self, config: Config, store: Store, library: Library, syncer: Syncer):
        self.config = config
        self.store = store
        self.library = library
        self.syncer = syncer  # to wake the writers after a pass
        self.clients = library.clients
        self.planner = syncer.planner  # the pass's decisions go through the same rules as webhooks
        self.stop_event = threading.Event()
        self._run_lock = threading.Lock()  # one pass at a time
        self.progress: dict[str, Any] = {"running": False}
        self._pending_state: list[tuple] = []  # filled while comparing one person, then flushed
        self._states: dict[
            str, dict
        ] = {}  # the known state of the items being compared, per server
        self._on_the_way: set[tuple[str, str, str]] = set()  # the person's changes still queued
        self._undone: dict[tuple, Any] = {}  # the person's values put back by an undo (class Undo)
        self._pending_forget: list[tuple] = []  # undone rows whose field is in step again
        self.last_dry_run: dict | None = (
            None  # kept in memory: a dry run changes nothing, not even this file
        )
        self._pending_jobs: list[Observation] = []
        self._playlist_cache: dict[
            tuple[str, str], dict[str, dict]
        ] = {}  # (server, user) → seen; one pass
        self._read_at = 0.0  # when the person being compared was read
        self.cause = ""  # of the jobs being queued: "pass:<n>" (the journal says why)
        self.preferences = Preferences(config, store, library, self.planner)
        self._configs: dict[str, dict[str, dict]] = {}  # server → user id → Configuration; one pass
        self.trigger = threading.Event()
        self.thread: SupervisedThread | None = None
        self.ping: Any = lambda what, body="": (
            None
        )  # healthchecks-style: start, success, fail (Alerts.ping)

    def last_report(self) -> dict | None:
        raw = self.store.get_meta("last_reconcile_report")
        return json.loads(raw) if raw else None

    def run(self, dry_run: bool = False, on_progress: Any = None) -> dict:
        """One pass. Returns the report: per person and server, what was (or would be) changed."""
        if not self._run_lock.acquire(blocking=False):
            raise SyncError("a reconciliation pass is already running")
        started = utcnow()
        number = 0 if dry_run else self.store.next_number("pass")
        self.cause = f"pass:{number}"
        report: dict[str, Any] = {
            "pass": number,
            "started_at": format_time(started),
            "dry_run": dry_run,
            "users": {},
            "changes": 0,
            "items_compared": 0,
            "errors": [],
        }
        self.progress = {
            "running": True,
            "phase": "reading users",
            "users_done": 0,
            "users_total": 0,
            "items_compared": 0,
            "changes_queued": 0,
            "dry_run": dry_run,
        }
        if not dry_run:
            self.ping("start")
        try:
            people = self._people(report)
            self.progress.update(users_total=len(people), phase="comparing")
            for person, accounts in sorted(people.items()):
                try:
                    self._reconcile_person(person, accounts, report, dry_run)
                    self._flush()
                except Exception as e:  # one person's failure never ends the others' pass
                    self._pending_state, self._pending_jobs, self._pending_forget = [], [], []
                    report["errors"].append(f"{person}: {_error_text(e)}")
                    if isinstance(e, SyncError):
                        log.warning("reconcile: %s: %s", person, e)
                    else:
                        log.error("reconcile: %s: unexpected error", person, exc_info=e)
                self.progress["users_done"] += 1
                if on_progress:
                    on_progress(self.progress)
            return self._finish(report, started, len(people))
        except Exception as e:
            if not dry_run:
                self.ping("fail", _error_text(e))
            raise
        finally:
            self.store.pass_seen_drop()
            self._let_go()
            self.progress = {**self.progress, "running": False, "phase": "done"}
            self._run_lock.release()

    def _let_go(self) -> None:
        """What a pass held for its last person (a page of known state, the changes on their
        way, the undone values) and for everyone (users' configurations, playlists): dropped
        when it ends, so the service at rest holds none of it until the next pass."""
        self._states, self._on_the_way, self._undone = {}, set(), {}
        self._playlist_cache, self._configs = {}, {}

    def _finish(self, report: dict, started: float, people: int) -> dict:
        """The end of a pass: its report kept (not a dry run's), pinged, logged; writers woken."""
        report["finished_at"] = format_time(utcnow())
        report["seconds"] = round(utcnow() - started, 2)
        dry_run = report["dry_run"]
        if not dry_run:
            self.store.set_meta("last_reconcile_report", json.dumps(report))
            summary = f"{report['changes']} changes queued in {report['seconds']} s"
            self.ping(
                "fail" if report["errors"] else "success", "\n".join([summary, *report["errors"]])
            )
            for target in {s.name for s in self.config.servers}:
                self.syncer.wake_target(target)
        # Said where people look, before the summary: a pass that read nothing is no success.
        for error in report["errors"]:
            log.warning("reconcile: %s", error)
        log.info(
            "reconcile%s: %d people, %d items compared, %d changes %s in %.1fs",
            " (dry run)"
            if dry_run
            else " (dry run: sync.dry_run, nothing is written)"
            if self.config.sync.dry_run
            else "",
            people,
            report["items_compared"],
            report["changes"],
            "found" if dry_run else "queued",
            report["seconds"],
        )
        return report

    def _people(self, report: dict) -> dict[str, dict[str, str]]:
        """Persons present on two or more servers: {person: {server: user id}}."""
        people: dict[str, dict[str, str]] = {}
        self._configs = {}
        for s in self.config.servers:
            try:
                # Everyone's preferences come with the users: no request of their own.
                self._configs[s.name] = Preferences.of_users(
                    self.library.refresh_users_and_index(s.name)
                )
            except JellyfinError as e:
                # Once the server's name: a JellyfinError's own text starts with it.
                refused = e.status in (401, 403)
                report["errors"].append(f"{s.name}: {refused_or(e)}" if refused else str(e))
                continue
        duplicated: dict[str, str] = {}  # person → a server where they have several accounts
        for person, row in self.library.synced_accounts():
            accounts = people.setdefault(person, {})
            if row.server in accounts:  # case-variant duplicates: reported, never guessed
                duplicated[person] = row.server
            accounts[row.server] = row.user_id
        for person, server in sorted(duplicated.items()):
            report["errors"].append(f"{person}: several accounts on {server}; skipped")
        return {
            p: accounts
            for p, accounts in people.items()
            if p not in duplicated and len(accounts) >= 2
        }

    def _read(self, server: str, user_id: str) -> None:
        """The person's interesting items on one server, into the Store's pass_seen table (a page
        at a time: never a dictionary of them all, issue 25).

        Being in the played, favourite or liked list says all that list is about, so those are
        read without UserData (the played list is the long one): their items get a partial
        UserData ({"Played": True, _PARTIAL: True} and the like), and _complete() reads the rest
        only where the servers disagree on played. The resume list carries UserData (positions).
        Items the index does not know yet are read with their paths, a hundred per request.
        """
        client = self.clients[server]
        page: list[tuple[str, bool, bool, bool, dict | None]] = []
        for flag, dto in client.user_lists(user_id):  # the resume list last: its full UserData
            ud = (dto.get("UserData") or {}) if flag is None else None
            page.append(
                (
                    normalise_id(dto["Id"]),
                    flag == "Played",
                    flag == "IsFavorite",
                    flag == "Likes",
                    ud,
                )
            )
            if len(page) >= INDEX_PAGE_SIZE:
                self.store.pass_seen_add(server, page)
                page = []
        if page:
            self.store.pass_seen_add(server, page)
        missing = self.store.pass_seen_unindexed(server)
        for i in range(0, len(missing), IDS_PER_REQUEST):
            rows = [
                item_info(client.server, d)
                for d in client.items_by_ids(missing[i : i + IDS_PER_REQUEST])
            ]
            if rows:
                self.store.upsert_items(rows)

    def _complete(self, accounts: dict[str, str], groups: list[dict], seen: dict) -> None:
        """Read the full UserData (dates, play counts) of played items known only from the played
        list, where the servers disagree on played: the decision and the write need them."""
        need: dict[str, list[str]] = {}
        for group in groups:
            uds = {srv: seen[srv].get(iid) or {} for srv, iid in group.items()}
            if len(group) < 2 or len({bool(ud.get("Played")) for ud in uds.values()}) < 2:
                continue
            for srv, iid in group.items():
                if uds[srv].get(_PARTIAL):
                    need.setdefault(srv, []).append(iid)
        for srv, ids in need.items():
            full = self.clients[srv].user_data_many(accounts[srv], ids)
            for iid in ids:
                seen[srv][iid] = full.get(iid) or seen[srv][iid]

    def _reconcile_person(
        self, person: str, accounts: dict[str, str], report: dict, dry_run: bool
    ) -> None:
        servers = [s for s in accounts]
        self._read_at = utcnow()
        self.store.pass_seen_clear()
        for srv in servers:
            self._read(srv, accounts[srv])
        self._on_the_way = self.store.changes_on_the_way(person)
        self._undone = self.store.undone_of(person)
        if self.config.sync.playlists:
            try:
                self._reconcile_playlists(person, accounts, report, dry_run)
            except Exception as e:
                # Their playlists wait for the next pass (mirroring from a partial read could
                # create duplicates); their watch state below does not.
                report["errors"].append(
                    f"{person}: playlists not compared this pass: {_error_text(e)}"
                )
                log.warning("reconcile: %s: playlists not compared: %s", person, _error_text(e))
        self.progress["phase"] = f"comparing {person}"
        configs = {
            s.name: self._configs[s.name][accounts[s.name]]
            for s in self.config.servers
            if accounts.get(s.name) in self._configs.get(s.name, {})
        }
        away = tuple(s for s in accounts if s not in configs)
        self.preferences.compare(person, configs, lambda: self.cause, report, dry_run, away)
        fields = [f for f in FIELDS if self.config.syncs(f)]
        # Group the same item across servers, starting from every item in anyone's lists, a page
        # at a time: what a pass holds is a page, whatever the size of the library (issue 25).
        # A group made from one server's item takes its matches on the others out of their turn
        # (pass_seen_grouped), so each item is compared once.
        for srv in servers:
            after = ""
            while page := self.store.pass_seen_page(srv, after, PASS_PAGE):
                after = page[-1][0].item_id
                items = [item for item, _ in page]
                groups: list[dict[str, str]] = [{srv: item.item_id} for item in items]
                for other in servers:
                    if other == srv:
                        continue
                    matches = self.library.lookup_many(items, other)
                    for group in groups:
                        if group[srv] in matches:
                            group[other] = matches[group[srv]]
                members = [(o, iid) for group in groups for o, iid in group.items() if o != srv]
                self.store.pass_seen_grouped(members)
                own = {item.item_id: ud for item, ud in page}
                self._compare_page(person, accounts, srv, groups, own, fields, report, dry_run)
                self._flush()

    def _compare_page(
        self,
        person: str,
        accounts: dict[str, str],
        start: str,
        groups: list[dict[str, str]],
        own: dict[str, dict],
        fields: list[str],
        report: dict,
        dry_run: bool,
    ) -> None:
        """Compare a page of groups made from ``start``'s items (``own``: their UserData): the
        other members' UserData and what we know of them all are read for this page only."""
        ids = {srv: [g[srv] for g in groups if srv in g] for srv in accounts}
        seen = {srv: own if srv == start else self.store.pass_seen_of(srv, ids[srv]) for srv in ids}
        self._states = {srv: self.store.states_of(srv, person, ids[srv]) for srv in ids}
        self._complete(accounts, groups, seen)
        for group in groups:
            report["items_compared"] += 1
            self.progress["items_compared"] += 1
            if len(group) < 2:
                continue
            current = {}
            for srv, iid in group.items():
                ud = seen[srv].get(iid)
                if ud is None:
                    # nothing noteworthy there: not played, no favourite, no position, no like
                    ud = {}
                current[srv] = ud
            if not self._as_agreed(group, current, fields):
                self._reconcile_item(person, group, current, accounts, fields, report, dry_run)

    def _as_agreed(
        self, group: dict[str, str], current: dict[str, dict], fields: list[str]
    ) -> bool:
        """Does every server hold, in every field compared, the value we last knew there, the
        same value everywhere (and no undo's value)? Then decide() finds no change and no
        disagreement, and there is nothing to record: the routine pass over servers in step ends
        here for almost every item, without building a view of each field (issue 25)."""
        values = {srv: read_fields(ud) for srv, ud in current.items()}
        moot = moot_fields({f: all(v[f] is True for v in values.values()) for f in fields})
        for field in fields:
            if field in moot:
                continue  # as in _reconcile_item: a played item's position is not compared
            if len({v[field] for v in values.values()}) > 1:
                return False
            for srv, iid in group.items():
                known = (self._states[srv].get(iid) or {}).get(field)
                if known is None or known[0] != values[srv][field]:
                    return False
                if (srv, iid, field) in self._undone:
                    return False
        return True

    def sync_item(self, person: str, group: dict[str, str], accounts: dict[str, str]) -> dict:
        """ "Sync this item now": read the person's state of one item on every server and queue
        what differs, by the same rules as a pass (first sight = union; later, the newest
        change)."""
        if not self._run_lock.acquire(blocking=False):
            raise SyncError("a reconciliation pass is running: try again when it has finished")
        report: dict[str, Any] = {"users": {}, "changes": 0, "items_compared": 0, "errors": []}
        try:
            self.cause = f"sync-item:{self.store.next_number('sync-item')}"
            self._states = {
                srv: self.store.states_of(srv, person, [iid]) for srv, iid in group.items()
            }
            self._on_the_way = self.store.changes_on_the_way(person)
            self._undone = self.store.undone_of(person)
            self._read_at = utcnow()
            current = {
                srv: self.clients[srv].user_data(accounts[srv], iid) for srv, iid in group.items()
            }
            fields = [f for f in FIELDS if self.config.syncs(f)]
            self._reconcile_item(person, group, current, accounts, fields, report, dry_run=False)
            self._flush()
        finally:
            self._let_go()
            self._run_lock.release()
        for target in group:
            self.syncer.wake_target(target)
        return report

    def _reconcile_item(
        self,
        person: str,
        group: dict[str, str],
        current: dict[str, dict],
        accounts: dict[str, str],
        fields: list[str],
        report: dict,
        dry_run: bool,
    ) -> None:
        priors = {srv: self._states[srv].get(iid, {}) for srv, iid in group.items()}
        values = {srv: read_fields(ud) for srv, ud in current.items()}
        kind = next(
            (i.type for srv, iid in group.items() if (i := self.store.get_item(srv, iid))), ""
        )
        fields = [
            f for f in fields if REGISTRY[f].applies_to(kind)
        ]  # a show: its heart, not "played"
        for srv, ud in current.items():
            # An item in none of the lists (played, favourite, resumable, liked) has no noteworthy
            # state — unless we knew it as played or liked: then it left a list (unplayed? a
            # re-watch? disliked or cleared?), and only reading it tells which (a handful at most).
            if not ud and any(
                priors[srv].get(f, (None,))[0] not in (None, False) for f in AMBIGUOUS_OFF_LIST
            ):
                current[srv] = self.clients[srv].user_data(accounts[srv], group[srv])
                values[srv] = read_fields(current[srv])
        moot: set[str] = set()  # fields a field True once this pass's jobs are applied resets
        for field in fields:
            if field in moot:
                continue  # a played item has no resume position: marking it played resets it
            if any((srv, iid, field) in self._on_the_way for srv, iid in group.items()):
                # A change of this field is still on its way (a removal settling, one held by the
                # brake, one owed to a server that is away): it is newer than what this pass
                # reads, and the queue carries it. Comparing now would write the old value back
                # where the person just changed it (issue 21: an owed unplayed came back played).
                continue
            views = []
            for srv, iid in group.items():
                prior, prior_at = priors[srv].get(field, (_UNKNOWN, 0.0))
                ud = current[srv]
                when = (
                    (parse_time(ud.get("LastPlayedDate")) or 0.0) if REGISTRY[field].dated else 0.0
                )
                cur = values[srv][field]
                undone = self._undone.get((srv, iid, field), _UNKNOWN) == cur
                views.append(
                    _View(
                        srv, iid, cur, prior, prior_at, when, int(ud.get("PlayCount") or 0), undone
                    )
                )
            decision = decide(field, views)
            # An undo's divergence ends once the person changed the field (the decision) or the
            # servers agree again; until then decide() leaves the field alone.
            ended = decision is not None or len({json.dumps(v.cur) for v in views}) == 1
            if not dry_run and ended and any(v.undone for v in views):
                self._pending_forget += [
                    (v.server, person, v.item_id, field) for v in views if v.undone
                ]
            after = decision[0] if decision else all(v.cur is True for v in views)
            moot |= moot_fields({field: after})  # the value once this pass's jobs are applied
            if decision is None:
                self._remember(person, views, field, None, dry_run)
                continue
            desired, source = decision
            targets = [v for v in views if v.cur != desired]
            self._remember(person, views, field, source, dry_run)
            item = self.store.get_item(source.server, source.item_id)
            name = self.library.display_name(item) if item else source.item_id
            sample = f"{describe(field, desired)} {name!r} (from {source.server})"
            for v in targets:
                _report_changes(report, person, v.server, 1, sample)
                if not dry_run:
                    self.progress["changes_queued"] = self.progress.get("changes_queued", 0) + 1
                    self._queue(
                        person, field, desired, source, v.server, name, item, current[v.server]
                    )

    @staticmethod
    def _item_key(item: ItemInfo) -> str | None:
        """An item's name across servers: its path, else a provider ID."""
        if item.path_key:
            return "path:" + item.path_key
        for column in ("imdb", "tmdb", "tvdb"):
            if getattr(item, column):
                return f"{column}:{getattr(item, column)}"
        return None

    def _reconcile_playlists(
        self, person: str, accounts: dict[str, str], report: dict, dry_run: bool
    ) -> None:
        """Mirror a person's own playlists by name: created private where missing; additions
        and removals since the last agreed members applied everywhere; first sight = union.
        Written directly (no webhook reports playlists, so there is no echo to suppress)."""
        lists: dict[
            str, dict[str, tuple[str, str, list[tuple[str, str, str]]]]
        ] = {}  # name → srv → …
        for srv, uid in accounts.items():
            client = self.clients[srv]
            for p in self._own_playlists(person, srv, uid, report):
                entries = []
                for dto in client.playlist_items(normalise_id(p["Id"]), uid):
                    item = item_info(client.server, dto)
                    key = self._item_key(item)
                    if key:
                        entries.append(
                            (key, item.item_id, str(dto.get("PlaylistItemId") or item.item_id))
                        )
                lists.setdefault(name_key(p["Name"]), {})[srv] = (
                    normalise_id(p["Id"]),
                    p["Name"],
                    entries,
                )
        for nkey, per_server in sorted(lists.items()):
            baseline = self.store.playlist_members(person, nkey)
            current = {
                srv: [k for k, _, _ in entries] for srv, (_, _, entries) in per_server.items()
            }
            if baseline is None:  # first sight: union, in the order of the longest list
                desired: list[str] = []
                for srv in sorted(current, key=lambda x: -len(current[x])):
                    desired += [k for k in current[srv] if k not in desired]
            else:
                added = [k for srv in current for k in current[srv] if k not in baseline]
                removed = {k for k in baseline for srv in current if k not in current[srv]}
                desired = [k for k in baseline + added if k not in removed]
                desired = list(dict.fromkeys(desired))
            title = next(iter(per_server.values()))[1]
            for srv, uid in accounts.items():
                try:
                    changes = self._sync_playlist(
                        srv, uid, title, per_server.get(srv), desired, dry_run
                    )
                    if changes and not dry_run:
                        self._journal_playlist(person, srv, title, per_server.get(srv), changes)
                except Exception as e:  # one playlist on one server: the others go on
                    report["errors"].append(
                        f"{person}: playlist {title!r} on {srv}: {_error_text(e)}"
                    )
                    if not isinstance(e, SyncError):
                        log.warning(
                            "reconcile: %s: playlist %r on %s: %s",
                            person,
                            title,
                            srv,
                            _error_text(e),
                        )
                    continue
                if changes:
                    _report_changes(
                        report, person, srv, changes, f"playlist {title!r}: {changes} change(s)"
                    )
            if not dry_run:
                self.store.set_playlist_members(person, nkey, desired)

    def _seen_playlists(self, srv: str, uid: str) -> dict[str, dict]:
        """{playlist id: its list entry} of what ``uid`` sees on ``srv``, read once per pass."""
        if (srv, uid) not in self._playlist_cache:
            found = self.clients[srv].playlists(uid)
            self._playlist_cache[(srv, uid)] = {normalise_id(p["Id"]): p for p in found}
        return self._playlist_cache[(srv, uid)]

    def _own_playlists(self, person: str, srv: str, uid: str, report: dict) -> list[dict]:
        """The playlists ``uid`` owns on ``srv``, as far as an API key can tell (never guessed)."""
        seen = self._seen_playlists(srv, uid)
        if self.clients[srv].ensure_version().playlist_owner_rule == "none":
            return list(seen.values())  # 10.8: every playlist they see counts, as before
        users = [row for row in self.store.all_users() if row.server == srv]
        admin = any(row.user_id == uid and row.is_admin for row in users)
        if not admin:
            return [p for p in seen.values() if p.get("CanDelete")]  # Playlist.CanDelete: the owner
        # An administrator may delete every playlist, so CanDelete says nothing of theirs. A
        # playlist they see is theirs unless a non-administrator owns it; if another
        # administrator sees it too, its owner cannot be told: reported, not mirrored.
        own = []
        for pid, p in seen.items():
            owner, admins = None, []
            for row in users:
                if row.user_id == uid:
                    continue
                theirs = self._seen_playlists(srv, row.user_id).get(pid)
                if theirs is None:
                    continue
                if row.is_admin:
                    admins.append(row.name)
                elif theirs.get("CanDelete"):
                    owner = row.name
                    break
            if owner is not None:
                continue
            if admins:
                report["errors"].append(
                    f"{person}: playlist {p['Name']!r} on {srv}: administrators "
                    f"{', '.join(sorted(admins))} see it "
                    "too, and an API key cannot tell whose it is: not mirrored (copy it by hand, "
                    "or make it "
                    "private to its owner)"
                )
                continue
            own.append(p)
        return own

    def _journal_playlist(
        self, person: str, srv: str, title: str, had: tuple | None, changes: int
    ) -> None:
        """A playlist write in the journal, so Recent syncs shows every write we make. (Not
        undoable: its members are not a value a write can put back.)"""
        self.store.log_write(
            source="reconcile",
            target=srv,
            username=person,
            item_name=f"playlist {title}",
            field="playlist",
            old=_items(len(had[2])) if had else "none",
            new=f"{changes} change(s)" if had else f"created with {_items(changes)}",
            user_key=person,
            cause=self.cause,
        )

    def _sync_playlist(
        self, srv: str, uid: str, title: str, have: tuple | None, desired: list[str], dry_run: bool
    ) -> int:
        """Make one server's copy of a playlist hold ``desired``; returns the number of changes."""
        client = self.clients[srv]
        wanted_ids = []
        for key in desired:
            kind, _, value = key.partition(":")
            column = "path_key" if kind == "path" else kind
            hits = self.store.find_items(srv, column, value)
            if len(hits) == 1:  # not on this server (or ambiguous): left out, never guessed
                wanted_ids.append((key, hits[0].item_id))
        if have is None:
            if not wanted_ids:
                return 0
            if not dry_run:
                client.create_playlist(title, uid, [i for _, i in wanted_ids])
                log.info("%s: created playlist %r with %d items", srv, title, len(wanted_ids))
            return len(wanted_ids)
        playlist_id, _, entries = have
        present = {k for k, _, _ in entries}
        to_add = [i for k, i in wanted_ids if k not in present]
        desired_keys = set(desired)
        to_remove = [entry for k, _, entry in entries if k not in desired_keys]
        if not dry_run:
            if to_add:
                client.add_to_playlist(playlist_id, uid, to_add)
            if to_remove:
                client.remove_from_playlist(playlist_id, to_remove)
            if to_add or to_remove:
                log.info(
                    "%s: playlist %r: %d added, %d removed", srv, title, len(to_add), len(to_remove)
                )
        return len(to_add) + len(to_remove)

    def _remember(
        self, person: str, views: list[_View], field: str, source: _View | None, dry_run: bool
    ) -> None:
        """Record what each server holds now, as the agreed baseline for the next pass."""
        if dry_run:
            return
        for v in views:
            if v.prior is not _UNKNOWN and v.prior == v.cur:
                continue
            if source is not None and v.cur != source.cur:
                continue  # about to be changed by a job, which records the outcome
            at = (v.when or utcnow()) if v is source else v.prior_at
            self._pending_state.append((v.server, person, v.item_id, field, v.cur, at))

    def _queue(
        self,
        person: str,
        field: str,
        desired: Any,
        source: _View,
        target: str,
        name: str,
        item: ItemInfo | None,
        target_state: dict,
    ) -> None:
        extra = Carried(
            event="reconcile",
            runtime=item.runtime if item else None,
            last_played=source.when or None,
            play_count=source.play_count,
            target_state=target_state,  # read by this pass moments ago: no second read needed
            state_read_at=self._read_at,
        )
        ob = Observation(
            server=source.server,
            user_key=person,
            username=person,
            item_id=source.item_id,
            item_name=name,
            field=field,
            value=desired,
            observed_at=utcnow(),
            targets=(target,),
            extra=extra,
            kind="order",
            cause=self.cause,
        )
        self._pending_jobs.append(ob)

    def _flush(self) -> None:
        """Write one person's baseline and jobs in two transactions, not thousands."""
        if self._pending_state:
            self.store.remember_states(self._pending_state)
        if self._pending_forget:
            self.store.forget_undone(self._pending_forget)
        if self._pending_jobs:
            self.planner.plan([(0, self._pending_jobs)])
        self._pending_state, self._pending_jobs, self._pending_forget = [], [], []

    # the thread: at start-up, every interval_minutes, and on demand
    def start(self) -> None:
        self.thread = SupervisedThread("reconciler", self._loop)
        self.thread.start()

    def _loop(self) -> None:
        rc = self.config.reconcile
        first = rc.on_startup
        interval = rc.interval_minutes * 60
        wait = RECONCILE_STARTUP_DELAY if first else (interval or None)
        while not self.stop_event.is_set():
            self.trigger.wait(wait)
            if self.stop_event.is_set():
                return
            dry = self.progress.get("requested_dry_run", False)
            self.trigger.clear()
            try:
                report = self.run(dry_run=dry)
                if dry:
                    self.last_dry_run = report
            except SyncError as e:
                log.warning("reconcile: %s", e)
            except Exception:
                log.exception("reconcile: unexpected error")
            wait = interval or None

    def request(self, dry_run: bool) -> None:
        self.progress["requested_dry_run"] = dry_run
        self.trigger.set()

    def stop(self) -> None:
        self.stop_event.set()
        self.trigger.set()


class RecentCheck:
    """Catches what no webhook brought (the plugin sends each event once and never retries, and
    a server may have no plugin at all): about once a minute, per person and server, one cheap
    read — the person's items, most recently played first (a page of RECENT_PAGE; another only
    while a whole page is newer than the watermark) — whose played items and resume points
    become observations, as if a webhook had reported them. The Planner decides as for
    webhooks: what we already know of that server (from a webhook, a pass or our own write) is
    dropped, so an item in step costs no write; anything else goes to the other servers, newest
    wins (the time is the item's LastPlayedDate). It never reports "unplayed", a position reset,
    a favourite or a like (the list cannot tell them): webhooks and the periodic passes do.

    The first check of a person on a server only notes where the list stands (the startup pass
    compares everything); later ones report what was played since. Each round also reads every
    server's users once (GET /Users holds everyone's UserConfiguration) and compares each
    person's language and playback preferences (class Preferences). Checks that keep finding news
    while the
    server posts no webhook feed Syncer.silent_plugin."""

    def __init__(self, config: Config, store: Store, library: Library, syncer: Syncer):
        self.config = config
        self.store = store
        self.library = library
        self.syncer = syncer
        self.clients = library.clients
        self.planner = syncer.planner
        self.stop_event = threading.Event()
        self.thread: SupervisedThread | None = None
        # Cost, for /api/status and the benchmark: requests and response bytes of the checks
        # so far, and how many (server, person) checks they were; apart, the GET /Users per server
        # and round that reads everyone's preferences.
        self.cost = {
            "checks": 0,
            "requests": 0,
            "bytes": 0,
            "settings_requests": 0,
            "settings_bytes": 0,
        }
        self.last_run: dict[str, float] = {}  # server → when its people were last checked
        self.news = 0  # observations found that no webhook had brought, since start
        self._cause = ""
        self.preferences = Preferences(config, store, library, self.planner)

    def start(self) -> None:
        self.thread = SupervisedThread("recent-check", self._loop)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()

    def _loop(self) -> None:
        every = self.config.reconcile.recent_check_seconds
        while not self.stop_event.is_set():
            try:
                self.run()
            except Exception:  # a bug: said, and the next round tries again
                log.exception("recent check: unexpected error")
            self.stop_event.wait(every)

    def run(self) -> int:
        """One round: every synced person on every reachable server. Returns the observations
        that were news (queued for the other servers)."""
        people = self._people()
        found = 0
        self._cause = ""  # "check:<n>", numbered once this round queues something
        for s in self.config.servers:
            health = self.syncer.health.get(s.name) or {}
            if health.get("reachable") is False or health.get("key_refused"):
                continue  # ServerHealth says it is away: its changes wait for it
            here = 0
            for person, accounts in sorted(people.items()):
                if s.name not in accounts or self.stop_event.is_set():
                    continue
                try:
                    here += self.check(s.name, person, *accounts[s.name])
                except JellyfinError as e:
                    log.info("recent check: %s: %s: %s", s.name, person, e)
                    if e.retryable:
                        break  # the server is unwell (down, 5xx): the next round tries again
                except SyncError as e:
                    log.warning("recent check: %s: %s: %s", s.name, person, e)
            self.last_run[s.name] = utcnow()
            if here:
                self.syncer.unbrought[s.name].append(utcnow())
                log.info(
                    "recent check: %d change(s) on %s that no webhook brought: queued", here, s.name
                )
            found += here
        if self.preferences.fields() and not self.stop_event.is_set():
            self._preferences(people)
        return found

    def _preferences(self, people: dict[str, dict[str, tuple[str, str]]]) -> int:
        """Everyone's language and playback preferences: one GET /Users per reachable server
        (every person's Configuration is in it), compared by Preferences. Returns the jobs
        queued."""
        configs: dict[str, dict[str, dict]] = {}
        for s in self.config.servers:
            health = self.syncer.health.get(s.name) or {}
            if health.get("reachable") is False or health.get("key_refused"):
                continue
            client = self.clients[s.name]
            requests, read = client.thread_counts()
            try:
                configs[s.name] = self.preferences.read(s.name)
            except JellyfinError as e:
                log.info("recent check: preferences not read: %s", e)  # e names the server
            finally:
                now_requests, now_read = client.thread_counts()
                # Per server, not per person: counted apart from the checks' per-person cost.
                self.cost["settings_requests"] += now_requests - requests
                self.cost["settings_bytes"] += now_read - read
        queued = 0
        for person, accounts in sorted(people.items()):
            mine = {
                srv: configs[srv][accounts[srv][0]]
                for srv in configs
                if srv in accounts and accounts[srv][0] in configs[srv]
            }
            away = tuple(srv for srv in accounts if srv not in mine)
            try:
                woken = self.preferences.compare(
                    person, mine, self._numbered, elsewhere=away, only_news=True
                )
            except SyncError as e:
                log.warning("recent check: %s: preferences: %s", person, e)
                continue
            queued += len(woken)
            for target in woken:
                self.syncer.wake_target(target)
        if queued:
            log.info("recent check: preferences changed: %d server(s) to update", queued)
        return queued

    def _numbered(self) -> str:
        """This round's cause ("check:<n>"), numbered once it queues something."""
        if not self._cause:
            self._cause = f"check:{self.store.next_number('check')}"
        return self._cause

    def _people(self) -> dict[str, dict[str, tuple[str, str]]]:
        """{person: {server: (user id, user name)}} of synced people with accounts on two or more
        servers (the user index as it is: read once per server, refreshed by passes and misses)."""
        for s in self.config.servers:
            with suppress(JellyfinError):
                self.library.ensure_users(s.name)
        people: dict[str, dict[str, tuple[str, str]]] = {}
        for person, row in self.library.synced_accounts():
            people.setdefault(person, {})[row.server] = (row.user_id, row.name)
        return {p: a for p, a in people.items() if len(a) >= 2}

    def check(self, server: str, person: str, user_id: str, username: str) -> int:
        """One person on one server: read, observe, plan. Returns how many observations were
        news."""
        client = self.clients[server]
        requests, read = client.thread_counts()
        mark = self.store.recent_watermark(server, person)
        recent: list[dict] = []
        try:
            for page in range(RECENT_MAX_PAGES):
                got = client.recently_played(user_id, page * RECENT_PAGE, RECENT_PAGE)
                recent += got
                oldest = min((_played_at(d) for d in got), default=0.0)
                if len(got) < RECENT_PAGE or mark is None or oldest <= mark:
                    break  # the page reached what an earlier check saw, or items never played
        finally:
            now_requests, now_read = client.thread_counts()
            self.cost["checks"] += 1
            self.cost["requests"] += now_requests - requests
            self.cost["bytes"] += now_read - read
        seen: dict[str, dict[str, Any]] = {}  # item id → {field: value, "_when", "_dto"}
        for dto in recent:
            ud, when = dto.get("UserData") or {}, _played_at(dto)
            if not dto.get("Id") or not when:
                continue  # never played: the end of what is recent
            entry: dict[str, Any] = {"_when": when, "_dto": dto}
            if ud.get("Played"):
                entry.update(played=True, position=0)  # as a webhook reports a finished item
            elif int(ud.get("PlaybackPositionTicks") or 0) > 0:
                # A resume point. Never "unplayed" (a re-watch starts as Played=false) nor a
                # position of 0 (stopped in the first minutes): those are left to webhooks and
                # passes.
                entry["position"] = int(ud["PlaybackPositionTicks"])
            else:
                continue
            seen[normalise_id(dto["Id"])] = entry
        newest = max((_played_at(d) for d in recent), default=0.0)
        if mark is None:
            # The first check only notes where the list stands (the pass at start compares the
            # rest). It records no state: a webhook for a change made just before must still
            # be news when it is planned.
            self.store.set_recent_watermark(server, person, newest)
            return 0
        batch = [
            (0, self._observations(server, person, username, iid, e))
            for iid, e in seen.items()
            if self._news(server, person, iid, e, mark)
        ]
        batch = [entry for entry in batch if entry[1]]
        total = sum(len(obs) for _, obs in batch)
        woken, dropped = self.planner.plan(batch) if batch else ([], 0)
        if newest > mark:
            self.store.set_recent_watermark(server, person, newest)
        for target in woken:
            self.syncer.wake_target(target)
        self.news += total - dropped
        return total - dropped

    def _news(self, server: str, person: str, item_id: str, entry: dict, mark: float) -> bool:
        """Should this item be observed? Played since the watermark, or an item we know of that
        server (Jellyfin dates a play from its start: a film seen half way by one check and
        finished after another item started is older than the watermark, and still news) — and
        not already what we know there. (The Planner would drop that too; read first, the usual
        case, the newest item seen again, costs no commit.)"""
        known = self.store.get_state(server, person, item_id)
        if entry["_when"] < mark and not known:
            return False  # played before the check began watching, and never seen since
        return not all(
            f in known and known[f][0] == entry[f] for f in ("played", "position") if f in entry
        )

    def _observations(
        self, server: str, person: str, username: str, item_id: str, entry: dict
    ) -> list[Observation]:
        dto, when = entry["_dto"], entry["_when"]
        self._numbered()
        targets = tuple(s.name for s in self.config.servers if s.name != server)
        ud = dto.get("UserData") or {}
        observed = self.planner.not_ahead(server, "LastPlayedDate", when, utcnow())
        item = self.store.get_item(server, item_id)
        name = self.library.display_name(item) if item else str(dto.get("Name") or item_id)
        extra = Carried(
            event="recent-check",
            runtime=dto.get("RunTimeTicks"),
            play_count=ud.get("PlayCount"),
            last_played=observed,
        )
        return [
            Observation(
                server=server,
                user_key=person,
                username=username,
                item_id=item_id,
                item_name=name,
                field=fld,
                value=entry[fld],
                observed_at=observed,
                targets=targets,
                extra=extra,
                cause=self._cause,
            )
            for fld in ("played", "position")
            if fld in entry and self.config.syncs(fld)
        ]

    def cost_per_minute(self) -> dict | None:
        """Requests and bytes per minute per person and server at recent_check_seconds, from
        the checks so far (None before the first)."""
        n, every = self.cost["checks"], self.config.reconcile.recent_check_seconds
        if not n or not every:
            return None
        per_minute = 60.0 / every
        return {
            "requests": round(self.cost["requests"] / n * per_minute, 2),
            "bytes": round(self.cost["bytes"] / n * per_minute),
        }


def _played_at(dto: dict) -> float:
    """An item's LastPlayedDate from its UserData (0.0: none)."""
    return parse_time((dto.get("UserData") or {}).get("LastPlayedDate")) or 0.0


# ── Safety net ───────────────────────────────────────────────────────────────
# What stops a sync from spreading damage (issue 16): the journal (sync_log's before/after) and
# Undo, the Brake on mass removals, Alerts, and portable export/import (Transfer).

UNDO_SCOPE_KEYS = ("id", "cause", "user", "server", "source", "since", "until")


class SafetyNet:
    """Undo, the brake and alerts, built once for the Service, the Web and the command line."""

    def __init__(self, config: Config, store: Store, syncer: Syncer, reasons: Any = lambda: []):
        self.undo = Undo(config, store, syncer.library, syncer.planner, syncer.wake_target)
        self.brake = Brake(config, store, self.undo, syncer.wake_target)
        self.alerts = Alerts(config, store, syncer, reasons)


@dataclass
class UndoChange:
    """One value an undo would put back: per target, person, item and field, the earliest value
    before and the latest after, as the journal has them; then what the target holds now."""

    server: str  # the target that was written
    user_key: str
    username: str
    item_id: str  # the item there
    item_name: str
    field: str
    before: Any
    source: str
    source_item_id: str | None  # where the job came from (it may be gone: retention)
    after: Any = None
    entry_after: dict = dataclasses.field(default_factory=dict)  # every field that write set
    entries: list[int] = dataclasses.field(default_factory=list)  # the journal entries
    now: Any = _UNKNOWN  # read from the target just now
    verdict: str = ""  # undo, already, changed_since, unknown
    error: str = ""  # why it cannot be read now


class Undo:
    """Writes back the values a scope of journal entries replaced, through the normal queue
    (journal, echo and retry rules included) — but only where the target still holds what we
    wrote: a newer change by the person wins and is reported, never clobbered. ``preview``
    reads each target's current values and says, per server, what would change, and what every
    server holds afterwards.

    An undo leaves the servers disagreeing on purpose (alice's like stays on home, where she
    made it; parents gets its "no rating" back), so each value it puts back is remembered (the
    ``undone`` table, written with the job's outcome). A pass then leaves that field of that
    item alone — it neither re-applies the undone write nor spreads the undo to the servers it
    did not touch (decide()) — until the person changes that field on any server: that change
    travels as usual, to the undone server too, and the mark is gone."""

    def __init__(
        self, config: Config, store: Store, library: Library, planner: Planner, wake: Any = None
    ):
        self.config = config
        self.store = store
        self.library = library
        self.planner = planner
        self.wake = wake or (lambda target: None)  # target name → wake its writers

    def scope(self, raw: dict) -> dict:
        """A scope from a request or the command line; SyncError if it says nothing to undo."""
        scope = {k: raw[k] for k in UNDO_SCOPE_KEYS if raw.get(k) not in (None, "")}
        if "id" in scope:
            entry_id = scope["id"]
            if isinstance(entry_id, str) and entry_id.strip().isdigit():
                entry_id = int(entry_id)
            if (
                isinstance(entry_id, bool)
                or not isinstance(entry_id, int)
                or not 1 <= entry_id <= INT64_MAX
            ):
                raise SyncError(f"id: a journal entry's id, a whole number from 1 to {INT64_MAX}")
            scope["id"] = entry_id
        if "cause" in scope:
            scope["cause"] = str(scope["cause"])
        if scope.get("user"):
            scope["user"] = name_key(str(scope["user"]))
        unknown = [
            k for k in ("server", "source") if k in scope and self.config.server(scope[k]) is None
        ]
        if unknown:
            raise SyncError(f"{unknown[0]}: {scope[unknown[0]]!r} is not a server from the config")
        if not set(scope) - {"since", "until"} and "since" not in scope:
            raise SyncError(
                "say what to undo: id, cause, user, server or source, and/or a time range from "
                "since"
            )
        return scope

    def _plan(self, scope: dict) -> tuple[list[UndoChange], int]:
        """(one change per target, person, item and field: the earliest value before and the
        latest after, as the journal has them; journal entries matched)."""
        entries = self.store.journal(scope)
        changes: dict[tuple, UndoChange] = {}
        for e in entries:
            entry = REGISTRY.get(e.field)
            if entry is None or not entry.undoable or not e.target_item_id or not e.user_key:
                continue  # accounts and entries from before the journal cannot be undone
            for fld, after in (e.after or {}).items():
                key = (e.target, e.user_key, e.target_item_id, fld)
                change = changes.get(key)
                if change is None:
                    change = changes[key] = UndoChange(
                        server=e.target,
                        user_key=e.user_key,
                        username=e.username,
                        item_id=e.target_item_id,
                        item_name=e.item_name,
                        field=fld,
                        before=(e.before or {}).get(fld),
                        source=e.source,
                        source_item_id=e.item_id,
                    )
                change.after = after
                change.entry_after = e.after or {}
                change.entries.append(e.id)
        return list(changes.values()), len(entries)

    def preview(self, raw_scope: dict) -> dict:
        """What an undo of the scope would do, per server: changes to make, changes refused
        because the target holds something else now, and those already as before."""
        scope = self.scope(raw_scope)
        changes, matched = self._plan(scope)
        self._read_now(changes)
        servers: dict[str, dict] = {}
        for ch in changes:
            entry = servers.setdefault(
                ch.server, {"undo": 0, "changed_since": 0, "already": 0, "unknown": 0}
            )
            entry.setdefault("sample", [])
            entry.setdefault("refused", [])
            if ch.now is _UNKNOWN:
                ch.verdict = "unknown"
            elif ch.now == ch.before:
                ch.verdict = "already"
            elif ch.now == ch.after:
                ch.verdict = "undo"
            else:
                ch.verdict = "changed_since"
            entry[ch.verdict] += 1
            line = (
                f"{ch.username}: {ch.item_name}: "
                f"{describe(ch.field, ch.after if ch.now is _UNKNOWN else ch.now)}"
                f" → {describe(ch.field, ch.before)}"
            )
            if ch.verdict == "undo" and len(entry["sample"]) < UNDO_SAMPLE:
                entry["sample"].append(line)
            elif ch.verdict in ("changed_since", "unknown") and len(entry["refused"]) < UNDO_SAMPLE:
                why = ch.error or f"changed since we wrote {describe(ch.field, ch.after)}"
                entry["refused"].append(f"{ch.username}: {ch.item_name}: {why}")
        return {
            "scope": {
                k: (format_time(v) if k in ("since", "until") else v) for k, v in scope.items()
            },
            "entries": matched,
            "changes": sum(1 for ch in changes if ch.verdict == "undo"),
            "servers": servers,
            "afterwards": self._afterwards(changes),
            "_changes": changes,
        }

    def _afterwards(self, changes: list[UndoChange]) -> dict[str, list[str]]:
        """Per server, what it holds once the undo is done — and after later passes, which leave
        it so — for the first UNDO_SAMPLE items and fields the undo puts back: {server: [line]}."""
        keys: list[tuple] = []  # (person, source, its item there, field), in journal order
        for ch in changes:
            key = (ch.user_key, ch.source, ch.source_item_id, ch.field)
            if ch.verdict == "undo" and key not in keys and len(keys) < UNDO_SAMPLE:
                keys.append(key)
        groups: dict[tuple, dict[str, dict]] = {key: {} for key in keys}  # → target → change
        for ch in changes:
            group = groups.get((ch.user_key, ch.source, ch.source_item_id, ch.field))
            if group is not None:
                group[ch.server] = ch
        rows: list[
            tuple
        ] = []  # (server, person, item id there, field, a change of the group, put back?)
        wanted: dict[tuple[str, str], set[str]] = {}  # (server, person) → item ids to read now
        for (user_key, source, source_item_id, fld), targets in groups.items():
            first = next(iter(targets.values()))
            try:
                src = (
                    self.library.source_item(source, source_item_id)
                    if source_item_id not in (None, PERSON_ITEM)
                    else None
                )
            except SyncError:
                src = None
            for s in self.config.servers:
                ch = targets.get(s.name)
                found = src if ch is None and s.name == source else None
                if ch is None and src is not None and s.name != source:
                    found = self.library.lookup(src, s.name)
                iid = ch.item_id if ch is not None else found.item_id if found is not None else None
                if (
                    source_item_id == PERSON_ITEM
                    and iid is None
                    and self._has_account(s.name, user_key)
                ):
                    iid = PERSON_ITEM  # a preference: every server the person has an account on
                if iid is None:
                    continue  # not on that server (or not matched): nothing to say there
                put_back = ch is not None and ch.verdict == "undo"
                if not put_back:
                    wanted.setdefault((s.name, user_key), set()).add(iid)
                rows.append((s.name, user_key, iid, fld, ch if put_back else first, put_back))
        now = self._read_values(wanted)
        out: dict[str, list[str]] = {}
        for server, user_key, iid, fld, ch, put_back in rows:
            value = (
                ch.before if put_back else now.get((server, user_key, iid), {}).get(fld, _UNKNOWN)
            )
            shown = "cannot be read now" if value is _UNKNOWN else describe(fld, value)
            line = (
                f"{ch.username}: {ch.item_name}: {shown} ({'put back' if put_back else 'as now'})"
            )
            out.setdefault(server, []).append(line)
        return out

    def _has_account(self, server: str, user_key: str) -> bool:
        try:
            return (
                self.library.user(
                    server, self.config.name_on(user_key, server), refresh_on_miss=False
                )
                is not None
            )
        except SyncError:
            return False

    def _read_values(
        self, wanted: dict[tuple[str, str], set[str]]
    ) -> dict[tuple[str, str, str], dict]:
        """{(server, person, item id): its fields now}; what cannot be read is left out."""
        out: dict[tuple[str, str, str], dict] = {}
        for (server, user_key), ids in wanted.items():
            try:
                user_id = self.library.user_id(server, user_key)
                if user_id is None:
                    continue
                data = self._fields_now(server, user_id, ids)
            except SyncError:
                continue
            for iid, fields in data.items():
                out[(server, user_key, iid)] = fields
        return out

    def _fields_now(self, server: str, user_id: str, ids: set[str]) -> dict[str, dict]:
        """{item id: its fields now} of one person on ``server``, a hundred items per request;
        PERSON_ITEM: their preferences (their UserConfiguration)."""
        client = self.library.clients[server]
        items = sorted(i for i in ids if i != PERSON_ITEM)
        out = {
            iid: read_fields(ud)
            for iid, ud in (client.user_data_many(user_id, items) if items else {}).items()
        }
        if PERSON_ITEM in ids:
            out[PERSON_ITEM] = read_preferences(client.user_configuration(user_id))
        return out

    def _read_now(self, changes: list[UndoChange]) -> None:
        """Each change's current value on its server ("now"), a hundred items per request."""
        by: dict[tuple[str, str], list[dict]] = {}
        for ch in changes:
            by.setdefault((ch.server, ch.user_key), []).append(ch)
        for (server, user_key), group in by.items():
            try:
                user_id = self.library.user_id(server, user_key)
                if user_id is None:
                    raise SyncError(f"no user for {user_key} on {server}")
                data = self._fields_now(server, user_id, {c.item_id for c in group})
            except SyncError as e:
                for ch in group:
                    ch.error = f"cannot read it now: {e}"
                continue
            for ch in group:
                fields = data.get(ch.item_id)
                if fields is None:
                    ch.error = f"no longer on {server}"
                else:
                    ch.now = fields[ch.field]

    def apply(self, raw_scope: dict, only: Any = None, kind: str = "undo") -> dict:
        """Preview, then queue the changes it found (the writer checks each target once more);
        ``only``: a test of each change (the brake's Discard undoes only removals)."""
        report = self.preview(raw_scope)
        todo = [
            ch for ch in report["_changes"] if ch.verdict == "undo" and (only is None or only(ch))
        ]
        report["changes"] = len(todo)
        if not todo:
            report["undo"] = None
            return report
        number = self.store.next_number(kind)
        now = utcnow()
        obs = [
            Observation(
                server=ch.server,
                user_key=ch.user_key,
                username=ch.username,
                item_id=ch.item_id,
                item_name=ch.item_name,
                field=ch.field,
                value=ch.before,
                observed_at=now,
                targets=(ch.server,),
                extra=Carried(event=kind, expect=ch.after, undo_of=tuple(ch.entries[:20])),
                kind="order",
                cause=f"{kind}:{number}",
            )
            for ch in todo
        ]
        for target in self.planner.plan([(0, obs)])[0]:
            self.wake(target)
        report["undo"] = f"{kind}:{number}"
        log.info("%s %d: %d change(s) queued (%s)", kind, number, len(obs), report["scope"])
        return report


def _removal_change(ch: UndoChange) -> bool:
    """An undo change whose write took state away (the brake's kind of change)."""
    return takes_state_away(ch.field, ch.after, moot_fields(ch.entry_after))


@dataclass
class HeldGroup:
    """The changes the brake holds from one source for one person."""

    source: str
    user: str  # the person's key
    username: str
    first: float  # when the first and the last of them arrived
    last: float
    changes: int = 0  # items
    jobs: int = 0  # one per target
    kinds: dict[str, int] = dataclasses.field(default_factory=dict)  # "unfavourited" → items
    targets: set[str] = dataclasses.field(default_factory=set)
    sample: list[str] = dataclasses.field(default_factory=list)

    @property
    def summary(self) -> str:
        kinds = ", ".join(
            f"{n:,} {kind}" for kind, n in sorted(self.kinds.items(), key=lambda kv: -kv[1])
        )
        return f"held: {self.changes:,} changes from {self.source} for {self.username}: {kinds}"

    def json(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "targets": sorted(self.targets),
            "first": format_time(self.first),
            "last": format_time(self.last),
            "summary": self.summary,
        }


def held_groups(store: Store, samples: int) -> list[HeldGroup]:
    """What the brake holds, per source and person, counted by kind of removal, in words."""
    groups: dict[tuple[str, str], HeldGroup] = {}
    for (
        source,
        user_key,
        username,
        fld,
        value,
        items,
        jobs,
        first,
        last,
        targets,
    ) in store.held_counts():
        g = groups.setdefault(
            (source, user_key), HeldGroup(source, user_key, username, first, last)
        )
        g.changes += items
        g.jobs += jobs
        kind = removal_word(fld, json.loads(value))
        g.kinds[kind] = g.kinds.get(kind, 0) + items
        g.targets.update(targets.split(","))
        g.first, g.last = min(g.first, first), max(g.last, last)
    for g in groups.values():
        if samples:
            rows = store.held_sample(g.source, g.user, samples)
            g.sample = [
                f"{removal_word(fld, json.loads(value))}: {name}" for fld, value, name in rows
            ]
    return list(groups.values())


class Brake:
    """The changes Planner._brake held, and what a person decides about them: Apply (they go,
    and the count starts afresh) or Discard (they are dropped, and by default the source is put
    back as the other servers hold it, so the next pass does not propose them again)."""

    def __init__(self, config: Config, store: Store, undo: Undo, wake: Any):
        self.config = config
        self.store = store
        self.undo = undo
        self.library = undo.library
        self.planner = undo.planner
        self.wake = wake  # target name → wake its writers

    def held(self) -> list[dict]:
        """The held groups as the dashboard and /api/held show them."""
        return [g.json() for g in held_groups(self.store, HELD_SAMPLE)]

    def apply(self, source: str, user: str) -> int:
        n = self.store.release_held(source, name_key(user))
        if n:
            log.info("brake: %d held change(s) from %s for %s applied by request", n, source, user)
            for target in {s.name for s in self.config.servers}:
                self.wake(target)
        return n

    def discard(self, source: str, user: str, restore: bool = True) -> dict:
        """Drop the held changes; with ``restore``, also put back what the same burst wrote
        before the brake engaged (removals from ``source`` for this person within the window,
        where the target still holds them), and give ``source`` back what the others hold."""
        jobs = self.store.discard_held(source, name_key(user))
        report = {
            "discarded": len({(j.source_item_id, j.field) for j in jobs}),
            "restored": 0,
            "errors": [],
        }
        report["undone"] = 0
        if jobs and restore:
            since = min(j.queued_at for j in jobs) - self.config.safety.brake_minutes * 60
            slipped = self.undo.apply(
                {"source": source, "user": name_key(user), "since": since},
                only=_removal_change,
                kind="discard",
            )
            report["undone"] = slipped["changes"]
            undone = [
                ch for ch in slipped["_changes"] if ch.verdict == "undo" and _removal_change(ch)
            ]
            before = {(ch.server, ch.item_id, ch.field): ch.before for ch in undone}
            cause = slipped["undo"] or f"discard:{self.store.next_number('discard')}"
            obs = self._restore(source, jobs, report["errors"], before, cause)
            obs += self._restore_reached(source, undone, {(o.item_id, o.field) for o in obs}, cause)
            if obs:
                self.planner.plan([(0, obs)])
            for target in {source, *(j.target for j in jobs)}:
                self.wake(target)
            report["restored"] = len(obs)
        log.info(
            "brake: %d held change(s) from %s for %s discarded; %d put back on %s",
            report["discarded"],
            source,
            user,
            report["restored"],
            source,
        )
        return report

    @staticmethod
    def _restore_reached(
        source: str, undone: list[UndoChange], have: set, cause: str
    ) -> list[Observation]:
        """Items the burst reached everywhere before the brake engaged have no held change: the
        source gets back the value the journal says the others had (``have``: already done)."""
        obs = []
        for ch in undone:
            key = (ch.source_item_id, ch.field)
            if ch.source != source or not key[0] or key in have:
                continue
            have.add(key)
            obs.append(
                Observation(
                    server=source,
                    user_key=ch.user_key,
                    username=ch.username,
                    item_id=key[0],
                    item_name=ch.item_name,
                    field=ch.field,
                    value=ch.before,
                    observed_at=utcnow(),
                    targets=(source,),
                    extra=Carried(event="discard"),
                    kind="order",
                    cause=cause,
                )
            )
        return obs

    def _restore(
        self, source: str, jobs: list[Job], errors: list[str], undone: dict, cause: str
    ) -> list[Observation]:
        """Orders that give ``source`` back what the other servers hold (read now, or, where
        the burst reached them before the brake engaged, what ``undone`` puts back there)."""
        by_target: dict[str, list[Job]] = {}
        for j in jobs:
            by_target.setdefault(j.target, []).append(j)
        obs: list[Observation] = []
        done: set[tuple[str, str]] = set()
        for target, group in sorted(by_target.items()):
            try:
                user_id = self.library.user_id(target, group[0].user_key)
                matches = {}
                for j in group:
                    src = self.library.source_item(source, j.source_item_id)
                    found = self.library.lookup(src, target) if src else None
                    if found:
                        matches[j.id] = found.item_id
                if user_id is None or not matches:
                    continue
                data = self.library.clients[target].user_data_many(
                    user_id, sorted(set(matches.values()))
                )
            except SyncError as e:
                errors.append(f"{target}: {e}")
                continue
            for j in group:
                ud = data.get(matches.get(j.id, ""))
                if ud is None or (j.source_item_id, j.field) in done:
                    continue
                value = undone.get((target, matches[j.id], j.field), read_fields(ud)[j.field])
                if value == j.value:
                    continue
                done.add((j.source_item_id, j.field))
                extra = Carried(
                    event="discard",
                    last_played=parse_time(ud.get("LastPlayedDate")),
                    play_count=ud.get("PlayCount"),
                )
                obs.append(
                    Observation(
                        server=source,
                        user_key=j.user_key,
                        username=j.username,
                        item_id=j.source_item_id,
                        item_name=j.item_name,
                        field=j.field,
                        value=value,
                        observed_at=utcnow(),
                        targets=(source,),
                        extra=extra,
                        kind="order",
                        cause=cause,
                    )
                )
        return obs


EXPORT_FORMAT = "jellyfin-db-sync watch history"  # the "format" of an export file (README: Export)
EXPORT_VERSION = 1


class Transfer:
    """Portable watch history: ``export`` writes, per person and server, every item's user data
    with what it takes to find the item elsewhere; ``plan_import`` matches a file's items on one
    server by the same rules as sync and queues what differs (brake and journal included)."""

    def __init__(self, config: Config, store: Store, library: Library, planner: Planner):
        self.config = config
        self.store = store
        self.library = library
        self.planner = planner

    # export
    def export(self, people: set[str] | None = None) -> dict:
        out: dict[str, Any] = {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "exported_at": format_time(utcnow()),
        }
        out["people"] = persons = {}
        for s in self.config.servers:
            self.library.refresh_users_and_index(s.name)
            self.library.refresh_index(s.name)
        for person, row in self.library.synced_accounts():
            if self.config.server(row.server) is None:
                continue  # a server no longer configured
            if people and person not in people:
                continue
            persons.setdefault(person, {})[row.server] = self._entries(row.server, row.user_id)
        return out

    def _entries(self, server: str, user_id: str) -> list[dict]:
        """Every item of one user on one server whose user data is not blank."""
        client = self.library.clients[server]
        found: dict[str, dict] = {}
        for _flag, dto in client.user_lists(user_id, full=True, dislikes=True):
            found[normalise_id(dto["Id"])] = dto
        entries = []
        for iid, dto in sorted(found.items()):
            item = self.library.source_item(server, iid)
            if item is None:
                continue
            ud = _user_data_entry(dto.get("UserData") or {}, item.type)
            entries.append({**self._identity(item, dto), **ud})
        return entries

    def _identity(self, item: ItemInfo, dto: dict) -> dict:
        ident: dict[str, Any] = {"name": item.name, "type": item.type}
        if dto.get("ProductionYear"):
            ident["year"] = dto["ProductionYear"]
        if item.path_key:
            ident["path"] = item.path_key
        ids = {c: getattr(item, c) for c in ("imdb", "tmdb", "tvdb") if getattr(item, c)}
        if ids:
            ident["ids"] = ids
        if item.type == "Episode" and item.series_id:
            series = self.library.source_item(item.server, item.series_id)
            if series:
                sids = {
                    c: getattr(series, c) for c in ("imdb", "tmdb", "tvdb") if getattr(series, c)
                }
                ident["series"] = {"name": series.name, **({"ids": sids} if sids else {})}
            ident["season"], ident["episode"] = item.season, item.episode
        if item.type == "Season" and item.series_id:
            series = self.library.source_item(item.server, item.series_id)
            if series:
                ident["series"] = self._identity(series, {"ProductionYear": series.year})
            ident["season"] = item.episode  # a Season's IndexNumber
        return ident

    # import
    def plan_import(self, data: Any, target: str, user: str | None, dry_run: bool) -> dict:
        """Match the file's items on ``target`` and queue (or, dry, only count) what differs."""
        if (
            not isinstance(data, dict)
            or data.get("format") != EXPORT_FORMAT
            or not isinstance(data.get("people"), dict)
        ):
            raise SyncError(
                f'not an export of this program (its "format" must be {EXPORT_FORMAT!r})'
            )
        if data.get("version") != EXPORT_VERSION:
            raise SyncError(
                f"export version {data.get('version')!r}: this program reads version "
                f"{EXPORT_VERSION}"
            )
        self.library.refresh_users_and_index(target)
        self.library.refresh_index(target)
        number = 0 if dry_run else self.store.next_number("import")
        report: dict[str, Any] = {
            "target": target,
            "people": {},
            "dry_run": dry_run,
            "cause": f"import:{number}",
        }
        obs: list[Observation] = []
        wanted = name_key(user) if user else None
        for person, per_server in sorted(data["people"].items()):
            if wanted and name_key(person) != wanted:
                continue
            entry = report["people"][person] = {
                "matched": 0,
                "not_found": 0,
                "changes": {},
                "sample": [],
            }
            user_id = self.library.user_id(target, name_key(person))
            if user_id is None:
                entry["error"] = f"no account for {person} on {target}"
                continue
            merged, names = self._merge(per_server, target, entry)
            current = self.library.clients[target].user_data_many(user_id, sorted(merged))
            for iid, want in sorted(merged.items()):
                item = self.store.get_item(target, iid)
                have = read_fields(current.get(iid) or {})
                for fld, value in self._differences(
                    have, want, entry, names[iid], item.type if item else ""
                ):
                    extra = Carried(
                        event="import",
                        last_played=want["last_played"],
                        play_count=want["play_count"],
                    )
                    obs.append(
                        Observation(
                            server=target,
                            user_key=name_key(person),
                            username=person,
                            item_id=iid,
                            item_name=names[iid],
                            field=fld,
                            value=value,
                            observed_at=utcnow(),
                            targets=(target,),
                            extra=extra,
                            kind="order",
                            cause=f"import:{number}",
                        )
                    )
        report["changes"] = len(obs)
        if obs and not dry_run:
            self.planner.plan([(0, obs)])
            log.info("import %d: %d change(s) queued for %s", number, len(obs), target)
        return report

    def _differences(
        self, have: dict, want: dict, entry: dict, name: str, kind: str
    ) -> list[tuple[str, Any]]:
        """The fields to write on one item of type ``kind`` (counted, and sampled, in the
        person's ``entry``)."""
        out = []
        for fld in FIELDS:
            if (
                not self.config.syncs(fld)
                or not REGISTRY[fld].applies_to(kind)
                or have[fld] == want[fld]
            ):
                continue
            if fld in moot_fields(want):
                continue  # marking played resets it
            entry["changes"][fld] = entry["changes"].get(fld, 0) + 1
            if len(entry["sample"]) < UNDO_SAMPLE:
                entry["sample"].append(
                    f"{name}: {describe(fld, have[fld])} → {describe(fld, want[fld])}"
                )
            out.append((fld, want[fld]))
        return out

    def _merge(
        self, per_server: Any, target: str, entry: dict
    ) -> tuple[dict[str, dict], dict[str, str]]:
        """{target item id: the wanted fields}, from every server's entries in the file; where
        several entries meet on one item, as a first reconciliation does: played or favourite
        anywhere wins, the furthest position, a like over a dislike, the largest count, the
        newest date."""
        merged: dict[str, dict] = {}
        names: dict[str, str] = {}
        if not isinstance(per_server, dict):
            raise SyncError("each person holds {server name: [items]}")
        for items in per_server.values():
            for e in items if isinstance(items, list) else []:
                if not isinstance(e, dict):
                    continue
                item = self.match(e, target)
                if item is None:
                    entry["not_found"] += 1
                    continue
                entry["matched"] += 1
                names[item.item_id] = self.library.display_name(item)
                w = merged.setdefault(item.item_id, {})
                for f in EXPORTED:
                    w[f.name] = f.merge(w.get(f.name, f.nothing), f.from_file(e.get(f.name)))
        return merged, names

    def match(self, e: dict, target: str) -> ItemInfo | None:
        """The file's item on ``target``: by path, provider ids, then series ids + S/E."""
        ids = e.get("ids") if isinstance(e.get("ids"), dict) else {}
        probe = ItemInfo(
            "",
            "",
            str(e.get("type") or ""),
            str(e.get("name") or ""),
            e.get("path") if isinstance(e.get("path"), str) else None,
            *(str(ids[c]) if ids.get(c) else None for c in ("imdb", "tmdb", "tvdb")),
            None,
            None,
            None,
            None,
            e.get("year")
            if isinstance(e.get("year"), int) and not isinstance(e.get("year"), bool)
            else None,
        )
        found = self.library.lookup(probe, target)
        series = e.get("series") if isinstance(e.get("series"), dict) else None
        if found is None and series and probe.type == "Season" and isinstance(e.get("season"), int):
            tseries = self.match({**series, "type": "Series"}, target)  # the show, then its season
            hits = self.store.find_season(target, tseries.item_id, e["season"]) if tseries else []
            return hits[0] if len(hits) == 1 else None
        if (
            found is None
            and series
            and isinstance(e.get("season"), int)
            and isinstance(e.get("episode"), int)
        ):
            sids = series.get("ids") if isinstance(series.get("ids"), dict) else {}
            ids = {c: str(sids[c]) for c in ("tvdb", "tmdb", "imdb") if sids.get(c)}
            return self.library.episode_of(target, ids, e["season"], e["episode"])
        return found


def _user_data_entry(ud: dict, item_type: str) -> dict:
    """The user data an export keeps of one item (README: Export and import): of a show or an
    album, its heart and rating only (SyncedField.folders)."""
    return {f.name: f.read(ud) for f in EXPORTED if f.applies_to(item_type)}


ALERT_FORMATS = ("json", "ntfy", "gotify", "discord", "slack")


def alert_format(url: str) -> tuple[str, str]:
    """(format, the URL to post to) for an alert URL: a prefix says it ("ntfy+https://…"),
    else the address does (Discord and Slack webhooks, ntfy.sh, Gotify's /message?token=); any
    other http(s) URL gets our JSON; any other scheme is Apprise's."""
    scheme, sep, rest = url.partition("://")
    kind, plus, real = scheme.partition("+")
    if plus and kind in ALERT_FORMATS:
        return kind, f"{real}{sep}{rest}"
    if scheme not in ("http", "https"):
        return "apprise", url
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    if host in ("discord.com", "discordapp.com") and parts.path.startswith("/api/webhooks/"):
        return "discord", url
    if host == "hooks.slack.com":
        return "slack", url
    if host == "ntfy.sh" or host.startswith("ntfy."):
        return "ntfy", url
    if parts.path.rstrip("/").endswith("/message") and "token=" in parts.query:
        return "gotify", url
    return "json", url


def alert_request(fmt: str, url: str, alert: dict) -> tuple[str, dict]:
    """(URL, JSON body) of one alert in one format; each is a plain HTTP POST."""
    title, message = alert["title"], alert["message"]
    if fmt == "ntfy":
        # ntfy's JSON publishing (POST to the server's root, the topic in the body): UTF-8 safe,
        # where its Title header would have to be Latin-1.
        parts = urllib.parse.urlsplit(url)
        topic = parts.path.strip("/")
        root = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/", parts.query, ""))
        priority = 4 if alert["level"] == "problem" else 3
        tags = ["warning"] if alert["level"] == "problem" else ["white_check_mark"]
        return root, {
            "topic": topic,
            "title": title,
            "message": message,
            "priority": priority,
            "tags": tags,
        }
    if fmt == "gotify":
        return url, {
            "title": title,
            "message": message,
            "priority": 8 if alert["level"] == "problem" else 4,
        }
    if fmt == "discord":
        return url, {"content": f"**{title}**\n{message}"[:2000]}
    if fmt == "slack":
        return url, {"text": f"*{title}*\n{message}"}
    return url, {"service": "jellyfin-db-sync", **alert}


class Alerts:
    """Tells a person when something needs them: changes failed after their retries, a server
    unreachable for longer than alerts.unreachable_minutes, changes held by the brake, the
    pipeline stuck. One alert when a condition begins and one when it clears — never a flood —
    and healthchecks-style pings around each reconciliation pass. Nothing here ever blocks
    syncing: a destination that fails is logged (without its address's secrets) and skipped."""

    def __init__(self, config: Config, store: Store, syncer: Syncer, reasons: Any):
        self.config = config
        self.store = store
        self.syncer = syncer
        self.reasons = reasons  # () → why the pipeline is not ready (Readiness.reasons)
        self.active: dict[str, str] = {}  # condition → its message, while it lasts
        self.recent: collections.deque = collections.deque(
            maxlen=20
        )  # what was sent, for the dashboard
        self.stop_event = threading.Event()

    def conditions(self) -> dict[str, str]:
        out: dict[str, str] = {}
        failed = self.store.open_job_counts().get("failed", 0)
        if failed:
            out["failed"] = (
                f"{failed:,} change(s) failed after their retries: retry or discard them on the "
                "dashboard"
            )
        limit = self.config.alerts.unreachable_minutes * 60
        for name, h in self.syncer.health.items():
            if h.get("key_refused"):
                # Not a passing outage: nothing reaches that server until someone fixes the key.
                out[f"refused:{name}"] = f"{name}: {h['error']}"
            elif h.get("down_since") and utcnow() - h["down_since"] >= limit:
                out[f"unreachable:{name}"] = (
                    f"{name} has been unreachable since {format_time(h['down_since'])}: "
                    f"{h['error']}"
                )
        for g in held_groups(self.store, samples=0):
            out[f"held:{g.source}:{g.user}"] = (
                f"{g.summary}. Apply or discard them on the dashboard."
            )
        for s in self.config.servers:
            silent = self.syncer.silent_plugin(s.name)
            if silent:
                out[f"silent:{s.name}"] = silent
        stuck = [r for r in self.reasons() if "stuck" in r or "not writable" in r]
        if stuck:
            out["stuck"] = "; ".join(stuck)
        return out

    def check(self) -> None:
        now = self.conditions()
        for key in sorted(set(now) - set(self.active)):
            self.send(
                {
                    "condition": key,
                    "level": "problem",
                    "title": _alert_title(key),
                    "message": now[key],
                }
            )
        for key in sorted(set(self.active) - set(now)):
            self.send(
                {
                    "condition": key,
                    "level": "resolved",
                    "title": f"resolved: {_alert_title(key)}",
                    "message": "it no longer needs you",
                }
            )
        self.active = now

    def send(self, alert: dict) -> list[dict]:
        """Deliver one alert to every destination; returns each one's result."""
        alert = {**alert, "at": format_time(utcnow())}
        results = []
        for url in self.config.alerts.urls:
            shown = url_shown(url)
            try:
                self._deliver(url, alert)
                results.append({"to": shown, "ok": True})
            except Exception as e:  # a destination's failure never stops the others, nor syncing
                error = without_url(
                    _error_text(e), url
                )  # an error may quote the URL, token and all
                log.warning("alert to %s not delivered: %s", shown, error)
                results.append({"to": shown, "ok": False, "error": error})
        self.recent.appendleft(
            {**alert, "delivered": sum(r["ok"] for r in results), "destinations": len(results)}
        )
        log.info("alert: %s: %s", alert["title"], alert["message"])
        return results

    def test(self) -> list[dict]:
        return self.send(
            {
                "condition": "test",
                "level": "test",
                "title": "test alert",
                "message": "alerts from jellyfin-db-sync reach you",
            }
        )

    @staticmethod
    def _deliver(url: str, alert: dict) -> None:
        fmt, real = alert_format(url)
        if fmt == "apprise":
            try:
                import apprise  # optional: only if the user installed it
            except ImportError:
                raise SyncError(
                    "Apprise URLs need Apprise (pip install apprise); http(s) URLs work without it"
                ) from None
            sender = apprise.Apprise()
            if not sender.add(url) or not sender.notify(
                title=alert["title"], body=alert["message"]
            ):
                raise SyncError("Apprise could not deliver it")
            return
        post_url, body = alert_request(fmt, real, alert)
        _post(post_url, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def ping(self, what: str, body: str = "") -> None:
        """healthchecks.io style: <url>/start, <url> (success), <url>/fail, with a short body."""
        base = self.config.alerts.healthchecks_url
        if not base:
            return
        url = base.rstrip("/") + {"start": "/start", "success": "", "fail": "/fail"}[what]
        try:
            _post(url, body.encode()[:10_000], {"Content-Type": "text/plain; charset=utf-8"})
        except Exception as e:
            log.warning(
                "healthchecks ping to %s not delivered: %s",
                url_shown(base),
                without_url(_error_text(e), url),
            )

    def loop(self) -> None:
        while not self.stop_event.wait(ALERT_CHECK_SECONDS):
            try:
                self.check()
            except StoreError as e:
                log.warning("alerts: %s", e)


def _alert_title(condition: str) -> str:
    kind, _, rest = condition.partition(":")
    return {
        "failed": "changes failed",
        "unreachable": f"{rest} unreachable",
        "refused": f"{rest} refuses the API key",
        "held": f"changes held by the brake ({rest.replace(':', ' for ')})",
        "stuck": "syncing is stuck",
        "silent": SILENT_WORDS.format(server=rest),
    }.get(kind, condition)


def _post(url: str, body: bytes, headers: dict) -> None:
    """One POST with a short timeout; an answer outside 2xx is an error."""
    import urllib.request

    request = urllib.request.Request(
        url, data=body, headers={"User-Agent": f"jellyfin-db-sync/{__version__}", **headers}
    )
    # noqa: S310 - the user's own URL
    with urllib.request.urlopen(request, timeout=ALERT_TIMEOUT) as resp:
        resp.read(1024)


# ── Older program ────────────────────────────────────────────────────────────
#
# Everything kept only for people switching from the older jellyfin-db-sync (0.0.x), so that
# their set-up works unchanged (docs/older-program.md): its database moved over once
# (OlderDatabase), the changes it still owed planned like webhooks (older_owed), and its words
# in our API — the doubled keys of its queue and sync log, and its log filters. Kept through
# the 1.x series, removed no earlier than 2.0 (README, "Moving from the older jellyfin-db-sync").
# To drop it: delete this section and every line marked "Older program" elsewhere — its config
# keys (SETTINGS, SyncConfig, CHOICE_ALIASES, ServerVersion.limits), examine_database,
# Store._open and Store.migration, Syncer._plan_one, Web (job_json, _log_filters, _log_json,
# and in _routes the trailing-slash webhook URL and /webhook/queue), check_config, and
# private_folders. The keys of /api/status, /api/queue and /api/servers it had are ours too
# (the dashboard reads them) and stay; fixtures/older-api-shapes.json lists every key it had.


# The older jellyfin-db-sync (0.0.x) kept its data in the same file by default
# (/data/jellyfin-db-sync.db): these tables (docs/older-program.md).
OLDER_TABLES = ("user_mappings", "sync_log", "pending_events", "item_path_cache")
# Its change kinds (pending_events.event_type) → our field and how to read the value.
OLDER_FIELDS: dict[str, tuple[str, Any]] = {
    "watched": ("played", lambda d: bool(d.get("is_played"))),
    "progress": ("position", lambda d: int(d.get("position_ticks") or 0)),
    "favorite": ("favorite", lambda d: bool(d.get("is_favorite"))),
    "likes": ("likes", lambda d: d.get("likes") if d.get("likes") in (True, False) else None),
    "rating": (
        "likes",
        lambda d: None if not d.get("rating") else float(d["rating"]) >= LIKE_RATING,
    ),
}
MIGRATED_EVENT = "Migrated"  # the inbox event type of a change the older program still owed


class OlderDatabase:
    """Moves the older program's file over to this schema, once: the file is first copied
    beside itself (a dated backup that is never deleted), then what still means something is
    carried over — every change it still owed (pending_events) as an inbox row the Planner turns
    into jobs like any webhook, and its sync history — and its tables make way for ours, all in
    one transaction: a crash half-way leaves the file as it was."""

    def __init__(self, path: str, conn: sqlite3.Connection):
        self.path = path
        self.conn = conn

    def migrate(self) -> None:
        backup = f"{self.path}.older-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.bak"
        copy = sqlite3.connect(backup)
        try:
            self.conn.backup(copy)
        finally:
            copy.close()
        owed, skipped = self._owed()
        history = self._history()
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            for table in OLDER_TABLES:
                c.execute(f"DROP TABLE IF EXISTS {table}")
            for statement in _statements(
                SCHEMA
            ):  # in this transaction (executescript would commit)
                c.execute(statement)
            c.executemany(
                "INSERT INTO inbox (server, event, received_at, body) VALUES (?, ?, ?, ?)", owed
            )
            c.executemany(
                "INSERT INTO sync_log (at, source, target, username, item_name, field, new, "
                "result, detail)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                history,
            )
            summary = {
                "backup": backup,
                "owed": len(owed),
                "skipped": skipped,
                "history": len(history),
                "at": utcnow(),
            }
            c.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            c.execute("INSERT INTO meta VALUES ('migrated_from_older', ?)", (json.dumps(summary),))
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")
        log.info(
            "database %s was the older jellyfin-db-sync's: copied to %s; carried over %d owed "
            "change(s) "
            "(%d of kinds this program does not sync: %s) and %d history line(s)",
            self.path,
            backup,
            len(owed),
            sum(skipped.values()),
            ", ".join(f"{k} {n}" for k, n in sorted(skipped.items())) or "none",
            len(history),
        )

    def _owed(self) -> tuple[list[tuple], dict[str, int]]:
        """Its unfinished queue, as inbox rows (server, event, received_at, body)."""
        rows = self.conn.execute(
            "SELECT event_type, source_server, target_server, username, item_id, item_name, "
            "event_data, created_at"
            " FROM pending_events WHERE status IN ('pending', 'processing', 'failed', "
            "'waiting_for_item') ORDER BY id"
        ).fetchall()
        owed, skipped = [], {}
        for kind, source, target, username, item_id, item_name, data, created in rows:
            try:
                field, read = OLDER_FIELDS[kind]
                value = read(json.loads(data or "{}"))
            except (KeyError, ValueError, TypeError):
                skipped[kind] = skipped.get(kind, 0) + 1
                continue
            when = parse_time(str(created)) or utcnow()
            body = {
                "NotificationType": MIGRATED_EVENT,
                "UtcTimestamp": format_time(when),
                "Target": target,
                "NotificationUsername": username,
                "ItemId": normalise_id(item_id),
                "Name": item_name,
                "Field": field,
                "Value": value,
            }
            owed.append((source, MIGRATED_EVENT, when, json.dumps(body)))
        return owed, skipped

    def _history(self) -> list[tuple]:
        """Its sync log, in our columns (its event kinds and success flag as our field and
        result)."""
        rows = self.conn.execute(
            "SELECT created_at, source_server, target_server, username, item_name, event_type, "
            "synced_value, success,"
            " message FROM sync_log ORDER BY id"
        ).fetchall()
        return [
            (
                parse_time(str(created)) or 0.0,
                source,
                target,
                username,
                item_name or "",
                OLDER_FIELDS.get(kind, (kind,))[0],
                value,
                "ok" if success else "failed",
                message,
            )
            for created, source, target, username, item_name, kind, value, success, message in rows
        ]


def older_owed(config: Config, server: str, ev: dict, observed: float) -> list[Observation]:
    """A change the older program acknowledged and still owed (see OlderDatabase): an order
    for its target, applied like any other (only what differs is written)."""
    key = config.person(server, ev["NotificationUsername"])
    target = ev["Target"]
    if (
        config.server(target) is None
        or not config.user_synced(key)
        or not config.syncs(ev["Field"])
    ):
        return []
    return [
        Observation(
            server=server,
            user_key=key,
            username=ev["NotificationUsername"],
            item_id=ev["ItemId"],
            item_name=ev.get("Name") or ev["ItemId"],
            field=ev["Field"],
            value=ev["Value"],
            observed_at=observed,
            targets=(target,),
            extra=Carried(
                event="migrated", last_played=observed if ev["Field"] == "played" else None
            ),
            kind="order",
            cause="migrated",
        )
    ]


# The older jellyfin-db-sync's words, kept in the keys it had (its API is a subset of ours):
# its event types for our fields, and its queue statuses for our job states.
OLDER_EVENT_TYPES = {
    "played": "watched",
    "position": "progress",
    "favorite": "favorite",
    "likes": "likes",
}
OLDER_STATUSES = {
    "running": "processing",
    "waiting": "waiting_for_item",
    "unreachable": "pending",
    "skipped": "failed",
    "done": "completed",
    "resolved": "completed",
}


def older_job_keys(job: Job) -> dict:
    """A queued change's kind and status in the older program's words (/api/events/…), beside
    ours (field, state)."""
    return {
        "event_type": OLDER_EVENT_TYPES.get(job.field, job.field),
        "status": OLDER_STATUSES.get(job.status, job.status),
    }


def older_log_keys(r: LogEntry) -> dict:
    """A sync log line in the older program's keys (/api/sync-log), beside ours (at, field,
    source, target, new, result, detail)."""
    return {
        "created_at": format_time(r.at),
        "event_type": OLDER_EVENT_TYPES.get(r.field, r.field),
        "source_server": r.source,
        "target_server": r.target,
        "synced_value": r.new,
        "success": r.result in DONE_RESULTS,
        "message": r.detail,
    }


def older_log_filters(q: Any, filters: dict) -> None:
    """The sync log's filters by the older program's names (source_server, target_server,
    event_type, since_minutes), put into ``filters`` as ours where ours are not given."""
    fields = {v: k for k, v in OLDER_EVENT_TYPES.items()}
    filters["source"] = filters["source"] or q.get("source_server")
    filters["target"] = filters["target"] or q.get("target_server")
    if q.get("event_type"):
        filters["field"] = fields.get(q.get("event_type"), q.get("event_type"))
    if q.get("since_minutes"):
        try:
            filters["since"] = utcnow() - float(q.get("since_minutes")) * 60
        except ValueError:
            raise bottle.HTTPError(400, "since_minutes must be a number") from None


# ── Web ──────────────────────────────────────────────────────────────────────


NO_SUCH_JOB = "no failed, skipped or waiting job with that id"  # retry and discard
NOT_RECONCILING = "reconciliation is not running in this process"  # its status and its start
DONE_RESULTS = ("ok", "noop", "stale", "dry_run")  # a sync log result that counts as a success
# GET /api/events/<list>: the job states each list holds.
EVENT_LISTS = {
    "pending": ("pending", "running"),
    "waiting": ("waiting", "unreachable"),
    "failed": ("failed", "skipped"),
}
# What a route returns for a JSON answer: its data, or (data, status) when that is not 200.
# JsonAnswers makes the response of it.
Answer = dict | list | tuple[dict | list, int]
# The words a person reads for our codes, here once: the API sends them (beside each code, and
# as "words" in /api/dashboard) and the dashboard shows only these — feed, inspector, legend.
RESULT_WORDS = {
    "ok": "written",
    "noop": "already so",
    "failed": "failed",
    "skipped": "skipped",
    "absent": "not on that server",
    "stale": "older",
    "dry_run": "dry run",
}
FIELD_WORDS = {
    "event": "webhook",
    **{f.name: f.label for f in REGISTRY.values()},
    "playlist": "playlist",
}
STATE_WORDS = {
    "pending": "pending",
    "running": "being written",
    "waiting": "waiting for the item",
    "unreachable": "waiting for {target} to answer",
    "failed": "failed",
    "skipped": "skipped",
    "held": "held by the brake",
    "resolved": "resolved",
    "done": "done",
    "discarded": "discarded",
    "absent": "not on that server",
}
# The charts' three colours: written, failed, and the other changes ("skipped, not on that server or
# dry run").
_OTHER_WORDS = [RESULT_WORDS[r] for r in CHANGE_RESULTS if r not in ("ok", "failed")]
CHART_WORDS = {
    "ok": RESULT_WORDS["ok"],
    "failed": RESULT_WORDS["failed"],
    "other": ", ".join(_OTHER_WORDS[:-1]) + " or " + _OTHER_WORDS[-1],
}
WORDS = {"result": RESULT_WORDS, "field": FIELD_WORDS, "state": STATE_WORDS, "chart": CHART_WORDS}


class Failures:
    """Failed attempts to prove who one is (a sign-in, an API token, the setup code), per
    address (an IPv4 address or an IPv6 /64, see client_key): after SIGN_IN_FAILURES within
    SIGN_IN_WINDOW, that address waits (429) until the oldest of them is that old."""

    def __init__(self) -> None:
        self._times: dict[str, list[float]] = {}  # client key → times of its recent failures
        self._lock = threading.Lock()  # guards _times
        self._slowing = threading.Lock()  # held while a failure is being slowed down

    def locked_out(self, address: str) -> int:
        """Seconds until ``address`` may try again; 0 if it may now.

        Counted per REMOTE_ADDR (Waitress drops proxy headers it cannot trust). Behind a reverse
        proxy every visitor shares its address: a guesser then locks everyone out of the sign-in
        for a while, never out of webhooks.
        """
        now = utcnow()
        with self._lock:
            recent = [
                t for t in self._times.get(client_key(address), ()) if t > now - SIGN_IN_WINDOW
            ]
            if len(recent) < SIGN_IN_FAILURES:
                return 0
            return int(recent[-SIGN_IN_FAILURES] + SIGN_IN_WINDOW - now) + 1

    def failed(self, address: str, what: str, slow_down: bool = False) -> None:
        now = utcnow()
        key = client_key(address)
        with self._lock:
            self._times.setdefault(key, []).append(now)
            self._times[key] = self._times[key][-SIGN_IN_FAILURES:]
            for a in [a for a, times in self._times.items() if times[-1] <= now - SIGN_IN_WINDOW]:
                del self._times[a]  # forget quiet addresses: the table stays small
        log.warning("failed %s from %s", what, address)
        # Slow guessing down, but never with more than one request thread at a time: the same
        # threads answer Jellyfin's webhooks. A second failure meanwhile is told at once.
        if slow_down and self._slowing.acquire(blocking=False):
            try:
                time.sleep(SIGN_IN_SLOWDOWN)
            finally:
                self._slowing.release()

    def forget(self, address: str) -> None:
        with self._lock:
            self._times.pop(client_key(address), None)


class SignIns(Failures):
    """Dashboard sign-in: sessions (kept in the database, so a restart signs nobody out; read
    from memory), and the limit on failed attempts (Failures)."""

    def __init__(self, config: Config, store: Store):
        super().__init__()
        self.config = config
        self.store = store
        self._sessions: dict[str, float] = store.sessions(utcnow())  # cookie's SHA-256 → expiry
        self._sessions_lock = threading.Lock()  # guards _sessions

    def credentials_ok(self, user: str, password: str) -> bool:
        ok_user = _secret_matches(user, self.config.auth_username)
        ok_pw = _secret_matches(
            password, self.config.auth_password
        )  # both compared, whatever the first says
        return ok_user and ok_pw

    def open_session(self, address: str) -> str:
        token = secrets.token_urlsafe(32)
        now = utcnow()
        self.store.add_session(_token_hash(token), now + SESSION_SECONDS, now)
        self.forget(address)
        with self._sessions_lock:
            for t in [t for t, exp in self._sessions.items() if exp <= now]:
                del self._sessions[t]
            self._sessions[_token_hash(token)] = now + SESSION_SECONDS
        return token

    def valid(self, cookie: str | None) -> bool:
        with self._sessions_lock:
            return bool(cookie) and self._sessions.get(_token_hash(cookie or ""), 0) > utcnow()

    def close(self, cookie: str | None) -> None:
        with self._sessions_lock:
            self._sessions.pop(_token_hash(cookie or ""), None)
        self.store.drop_session(_token_hash(cookie or ""))


def _token_hash(token: str) -> str:
    """What is kept of a sign-in cookie: enough to recognise it, useless to whoever reads the
    file."""
    return hashlib.sha256(token.encode()).hexdigest()


def _json_response(status: int, data: dict, headers: dict | None = None) -> Any:
    return bottle.HTTPResponse(
        json.dumps(data), status, {"Content-Type": "application/json", **(headers or {})}
    )


class Guard:
    """Bottle plugin: every route but those marked ``open=True`` needs a sign-in (when
    server.auth is set); without one, only Host names that cannot be a rebinding attacker's
    are served; and a POST must not come from another site's page (CSRF). Webhooks are marked
    open: the plugin cannot sign in, and their token is checked by the route itself."""

    name = "guard"
    api = 2

    def __init__(self, config: Config, sign_ins: SignIns):
        self.config = config
        self.sign_ins = sign_ins
        # Where browsers may send writes from: this service's own address as the browser sees
        # it — the Host header, or server.public_url behind a reverse proxy that rewrites Host.
        public = urllib.parse.urlsplit(config.public_url)
        self.public_netloc, self.public_scheme = public.netloc.lower(), public.scheme.lower()
        self.token_failures = Failures()  # wrong API tokens, per address (bearer_ok)

    def apply(self, callback: Any, route: Any) -> Any:
        if route.config.get("webhook"):
            return callback

        def guarded(*args: Any, **kwargs: Any) -> Any:
            self.check(open_route=bool(route.config.get("open")))
            return callback(*args, **kwargs)

        return guarded

    def check(self, open_route: bool) -> None:
        req = bottle.request
        if not self.config.auth_username and not host_allowed(
            req.headers.get("Host") or "", self.config
        ):
            # DNS rebinding: without a sign-in, a page on another site could reach this dashboard
            # through a name of its own that resolves here; such a name is never ours.
            host = _shorten(req.headers.get("Host") or "")
            raise _json_response(
                403,
                {
                    "error": f"Host {host!r} is not allowed: add it to server.allowed_hosts "
                    "(or set server.public_url)"
                },
            )
        if req.method == "POST" and self.cross_site():
            raise _json_response(403, {"error": "cross-site request refused"})
        if not open_route and req.method not in ("GET", "HEAD") and req.path != "/logout":
            self.check_write()
        if open_route or self.authenticated():
            return
        if req.path == "/":
            raise bottle.HTTPResponse(status=303, headers={"Location": "/login"})
        raise _json_response(
            401,
            {
                "error": "sign in first: the dashboard's /login, HTTP basic auth with server.auth, "
                "or 'Authorization: Bearer <server.api_token>'"
            },
        )

    def check_write(self) -> None:
        """A request that changes something (every POST but the webhooks' and the sign-in's)
        needs someone known: a signed-in session when server.auth is set, or the API token.
        Without either configured, nobody is known, and the dashboard and API are read-only."""
        if self.config.auth_username:
            return  # authenticated() decides: session, HTTP basic or the API token
        if self.bearer_ok():
            return
        if _bearer(bottle.request.environ) and self.config.api_token:
            raise _json_response(
                403, {"error": "wrong API token: use server.api_token as 'Authorization: Bearer …'"}
            )
        raise _json_response(403, {"error": read_only_reason(self.config), "read_only": True})

    def bearer_ok(self) -> bool:
        """The request carries the API token. Wrong tokens are counted per address apart from
        failed sign-ins (a password guesser does not lock scripts out): after SIGN_IN_FAILURES
        of them the address gets 429 for a while, right token or not (a guess during the wait
        tells nothing)."""
        given = _bearer(bottle.request.environ)
        if not given or not self.config.api_token:
            return False  # no token configured: nothing to guess, nothing to count
        address = bottle.request.environ.get("REMOTE_ADDR", "?")
        wait = self.token_failures.locked_out(address)
        if wait:
            raise _json_response(
                429,
                {"error": f"too many wrong API tokens from your address: try again in {wait} s"},
                {"Retry-After": str(wait)},
            )
        if _secret_matches(given, self.config.api_token):
            return True
        self.token_failures.failed(address, "API token")
        return False

    def cross_site(self) -> bool:
        """A write sent by another site's page in this browser (CSRF)."""
        headers = bottle.request.headers
        site = headers.get("Sec-Fetch-Site")
        if site in ("same-origin", "none"):  # set by the browser; a page cannot forge it
            return False
        if site:  # cross-site, same-site (another port or subdomain)
            return True
        # Older browsers: the Origin, or failing that the Referer, must be this service.
        origin = headers.get("Origin") or headers.get("Referer")
        if not origin:
            return False  # not a browser's cross-site form or fetch (those carry one of them)
        if origin.strip().lower() == "null":
            return True  # a sandboxed frame, a data: URL or a file: page: never our own page
        try:
            parts = urllib.parse.urlsplit(origin)
            parts.port  # noqa: B018 - a port that is no number is as unreadable as the rest
        except ValueError:
            return True  # not a URL a browser would send: not our page
        netloc = parts.netloc.lower()
        if self.public_netloc and netloc == self.public_netloc:
            # Our public address, but by its scheme: a page served over plain http (on a network
            # that can rewrite it) must not write to the https service.
            return parts.scheme.lower() != self.public_scheme
        return netloc != (headers.get("Host") or "").lower()

    def authenticated(self) -> bool:
        if not self.config.auth_username:
            return True
        req = bottle.request
        if self.bearer_ok():
            return True
        auth = req.headers.get("Authorization", "")
        if auth[:6].lower() != "basic ":
            return self.sign_ins.valid(req.get_cookie("jds_session"))
        address = req.environ.get("REMOTE_ADDR", "?")
        try:
            user, _, password = base64.b64decode(auth[6:].strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        wait = self.sign_ins.locked_out(address)
        if wait:
            raise _json_response(
                429,
                {"error": f"too many failed sign-ins from your address: try again in {wait} s"},
                {"Retry-After": str(wait)},
            )
        if not self.sign_ins.credentials_ok(user, password):
            self.sign_ins.failed(address, "sign-in (HTTP basic)")
            return False
        return True


class Web:
    """The HTTP surface, as Bottle intends: an app built from the route methods below (no
    lambdas), which return their answer's data; the JsonAnswers plugin makes the JSON response
    of it, the Guard plugin checks sign-in, Host and CSRF; JSON error pages, and security headers
    on every answer (checked_call). It reads the other parts through their public methods only."""

    def __init__(
        self,
        config: Config,
        store: Store,
        syncer: Syncer,
        reconciler: Reconciler | None = None,
        started_at: float | None = None,
        threads: Any = None,
        safety: SafetyNet | None = None,
        settings: Setup | None = None,
    ):
        self.safety = safety
        self.settings = settings  # the setup page, to edit the settings later (signed in)
        self.config = config
        self.store = store
        self.syncer = syncer
        self.reconciler = reconciler
        self.recent_check: RecentCheck | None = None  # set by the Service
        self.started_at = started_at or utcnow()
        self.sign_ins = SignIns(config, store)
        self._last_alert_test = -HOUR  # monotonic time of the last "Send test" (ALERT_TEST_SECONDS)
        self.rejections: dict[str, dict] = {}  # server → refused webhooks: count, last reason, hint
        self._history_cache: dict[str, tuple[float, Any]] = {}  # key → (monotonic expiry, value)
        self._rejections_lock = threading.Lock()
        self._rejections_logged = Throttle()  # per server
        self.ready = Readiness(store, syncer, threads or (lambda: list(syncer.threads)))
        self.app = JsonBottle()
        self.app.install(Guard(config, self.sign_ins))
        self._routes()

    def __call__(self, environ: dict, start_response: Any) -> Any:
        return checked_call(self.app, environ, start_response)

    def _routes(self) -> None:
        a = self.app
        a.route("/webhook/<server_name>", "POST", self.webhook, webhook=True)
        a.route(
            "/webhook/<server_name>/", "POST", self.webhook, webhook=True
        )  # as the older program took it
        a.route("/webhook/test", "GET", self.webhook_test)
        a.route("/webhook/queue", "GET", self.webhook_queue)
        a.route("/healthz", "GET", _healthz, open=True)
        a.route("/readyz", "GET", self.readyz, open=True)
        a.route("/login", "GET", self.login_page, open=True)
        a.route("/login", "POST", self.login, open=True)
        a.route("/logout", "POST", self.logout)
        a.route("/api/status", "GET", self.status_json)
        a.route("/api/dashboard", "GET", self.api_dashboard)
        a.route("/api/fields", "GET", self.api_fields)
        a.route("/api/servers", "GET", self.servers_status)
        a.route("/api/queue", "GET", self.queue_status)
        a.route(f"/api/events/<state:re:{'|'.join(EVENT_LISTS)}>", "GET", self.api_jobs)
        a.route("/api/servers/<name>/setup-webhook", "POST", self.api_setup_webhook)
        a.route("/api/inspect", "GET", self.api_inspect)
        a.route("/api/inspect/sync", "POST", self.api_inspect_sync)
        a.route("/api/events/<job_id:int>/retry", "POST", self.api_retry)
        a.route("/api/events/retry-all", "POST", self.api_retry_all)
        a.route("/api/events/<job_id:int>/discard", "POST", self.api_discard)
        a.route("/api/reconcile", "GET", self.api_reconcile_status)
        a.route("/api/reconcile", "POST", self.api_reconcile)
        a.route("/api/timeline", "GET", self.timeline_json)
        a.route("/metrics", "GET", self.metrics)
        a.route("/api/sync-log", "GET", self.log_page_json)
        a.route("/api/journal", "GET", self.api_journal)
        a.route("/api/undo", "POST", self.api_undo)
        a.route("/api/held", "GET", self.api_held_list)
        a.route("/api/held/<action:re:apply|discard>", "POST", self.api_held)
        a.route("/api/alerts", "GET", self.alerts_json)
        a.route("/api/alerts/test", "POST", self.api_alerts_test)
        a.route("/api/users", "GET", self.users_json)
        a.route("/api/users/passwords", "GET", self.api_passwords)
        a.route("/api/users/passwords/<password_id:int>/ack", "POST", self.api_ack_password)
        a.route("/", "GET", self.index)
        a.route("/static/style.css", "GET", _stylesheet, open=True)  # the sign-in page's
        a.route("/static/icon.svg", "GET", _favicon, open=True)
        a.route("/favicon.ico", "GET", _favicon, open=True)  # asked for by browsers and bookmarks
        a.route("/static/<path:path>", "GET", _static)
        if (
            self.settings is not None
        ):  # the setup page edits the settings later: signed in (the Guard)
            a.route("/setup", "GET", self.settings.page)
            a.route("/api/setup", "GET", self.settings.describe)
            a.route("/api/setup/test", "POST", self.settings.test_server)
            a.route("/api/setup/save", "POST", self.settings.save)

    # webhooks
    def webhook(self, server_name: str) -> Answer:
        """POST /webhook/<server_name>: 202 once the event is committed, 200 if it needs no sync."""
        environ = bottle.request.environ
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return self._refuse(server_name, 400, "bad Content-Length")
        if length > MAX_BODY_BYTES:
            return self._refuse(server_name, 413, f"body larger than {MAX_BODY_BYTES} bytes")
        token = self.config.webhook_token_for(server_name)
        if token and not _token_ok(environ, token):
            return self._refuse(server_name, 401, "missing or wrong webhook token")
        try:
            result = self.syncer.accept_webhook(server_name, bottle.request.body.read())
        except WebhookError as e:
            return self._refuse(server_name, e.status, str(e))
        except StoreError as e:
            # Disk full, database locked…: say so, so it shows in Jellyfin's log.
            log.error("webhook from %s not stored: %s", server_name, e)
            return {"error": f"cannot store the event: {e}"}, 503
        return result, (202 if result["status"] == "queued" else 200)

    def _refuse(self, server: str, status: int, reason: str) -> Answer:
        """A refused webhook: answered with why, and counted per server with the last reason, so
        "webhooks are not arriving" can be read on the dashboard instead of in Jellyfin's log."""
        if self.config.server(server) is not None:
            hint = rejection_hint(status, reason)
            with self._rejections_lock:
                entry = self.rejections.setdefault(server, {"count": 0})
                entry.update(
                    count=entry["count"] + 1, last_reason=reason, last_at=format_time(utcnow())
                )
                entry["hint"] = hint
            # The owner reads `docker logs`, not Jellyfin's: one line a minute at most per
            # server, since a misconfigured plugin posts on every play, pause and tick.
            if self._rejections_logged.due(server, REFUSED_LOG_SECONDS):
                log.warning("webhook from %s refused (%d, %s): %s", server, status, reason, hint)
        return {"error": reason}, status

    def webhook_queue(self) -> dict:
        """The older program's GET /webhook/queue: its two keys of /api/queue."""
        queue = self.queue_status()
        return {k: queue[k] for k in ("pending_events", "worker_running")}

    def webhook_test(self) -> Answer:
        return {"status": "ok", "message": "Webhook receiver is running"}

    # probes
    def readyz(self) -> Answer:
        reasons = self.ready.reasons()
        if reasons:
            return {"status": "not ready", "reasons": reasons}, 503
        return {"status": "ready"}

    # sign-in
    def login_page(self) -> str:
        return LOGIN_PAGE.replace("{message}", "")

    def login(self) -> str:
        form = bottle.request.forms
        user, password = form.getunicode("username") or "", form.getunicode("password") or ""
        if not self.config.auth_username:
            raise bottle.HTTPResponse(status=303, headers={"Location": "/"})
        address = bottle.request.environ.get("REMOTE_ADDR", "?")
        wait = self.sign_ins.locked_out(address)
        if wait:
            bottle.response.status = 429
            bottle.response.set_header("Retry-After", str(wait))
            minutes = wait // 60 + 1
            message = f"Too many failed sign-ins from your address: try again in {minutes} minutes."
            return LOGIN_PAGE.replace("{message}", f'<p class="bad" role="alert">{message}</p>')
        if not self.sign_ins.credentials_ok(user, password):
            self.sign_ins.failed(address, "dashboard sign-in", slow_down=True)
            bottle.response.status = 401
            return LOGIN_PAGE.replace(
                "{message}", '<p class="bad" role="alert">Wrong user name or password.</p>'
            )
        bottle.response.set_cookie(
            "jds_session",
            self.sign_ins.open_session(address),
            httponly=True,
            samesite="strict",
            path="/",
            max_age=SESSION_SECONDS,
            secure=self.config.public_url.startswith(
                "https://"
            ),  # behind an https proxy: never sent in clear
        )
        bottle.response.status = 303
        bottle.response.set_header("Location", "/")
        return ""

    def logout(self) -> Answer:
        self.sign_ins.close(bottle.request.get_cookie("jds_session"))
        bottle.response.delete_cookie("jds_session", path="/")
        return {"success": True}

    # status
    def queue_status(self) -> dict:
        counts = {
            **self.store.open_job_counts(),
            "done": self._cached("count_done", self.store.count_done),
        }
        return {
            "pending_events": counts.get("pending", 0) + self.store.count_unplanned(),
            "processing_events": counts.get("running", 0),
            "waiting_for_item_events": counts.get("waiting", 0),
            "waiting_for_server_events": counts.get(
                "unreachable", 0
            ),  # its server is down: sent when it is back
            "failed_events": counts.get("failed", 0),
            "skipped_events": counts.get("skipped", 0),
            "held_events": counts.get("held", 0),  # by the brake: apply or discard them
            "done_events": counts.get("done", 0),
            # The same lines as the per-minute chart over the last hour and the sync log's
            # "changes".
            "changes_last_hour": sum(
                p["ok"] + p["failed"] + p["other"] for p in self.store.timeline(60)
            ),
            "worker_running": self.syncer.alive(),
        }

    def servers_status(self) -> list[dict]:
        last = self.store.last_event_at()
        users = collections.Counter(u.server for u in self.store.all_users())
        out = []
        for s in self.config.servers:
            h = self.syncer.health[s.name]
            version = self.syncer.clients[s.name].version
            out.append(
                {
                    "name": s.name,
                    "url": s.url,
                    "passwordless": s.passwordless,
                    "healthy": bool(h["healthy"]),
                    "reachable": h["reachable"],
                    "key_refused": h["key_refused"],
                    "error": h["error"],
                    "version": h["version"],
                    "latency_ms": h["latency_ms"],
                    "limits": version.limits(self.config.sync) if version else [],
                    "user_count": users[s.name],
                    "rejected_webhooks": dict(self.rejections.get(s.name, {"count": 0})),
                    "webhook_url_path": f"/webhook/{s.name}",
                    "last_webhook_at": format_time(last[s.name]) if s.name in last else None,
                    **self._webhook_setup_json(s.name),
                    # The recent check keeps finding changes no webhook brought
                    # (Syncer.silent_plugin).
                    "plugin_silent": self.syncer.silent_plugin(s.name),
                }
            )
        return out

    def _webhook_setup_json(self, server: str) -> dict:
        """When "Set up webhooks" last succeeded for ``server`` and the first webhook since
        (None while it is awaited): the card says "set up at …; waiting for the first event"."""
        setup = self.store.webhook_setup(server)
        return {
            "webhook_set_up_at": format_time(setup["at"]) if setup else None,
            "first_webhook_at": format_time(setup["first"]) if setup and setup["first"] else None,
            "awaiting_first_webhook": bool(setup) and setup["first"] is None,
        }

    def status_json(self) -> dict:
        queue = self.queue_status()
        servers = self.servers_status()
        stats = self._cached("sync_stats", self.store.sync_stats)
        by = stats["by_result"]
        problems = self.ready.reasons()  # the pipeline itself: database, threads, a stuck planner
        if problems:
            status = "unhealthy"
        elif all(s["healthy"] for s in servers):
            status = "healthy"
        else:
            status = "degraded" if any(s["healthy"] for s in servers) else "unhealthy"
        return {
            "status": status,
            "version": __version__,
            "uptime_seconds": round(utcnow() - self.started_at, 1),
            "servers": servers,
            "queue": queue,
            "database": self.database_status(queue),
            "sync_stats": {
                "total_synced": sum(by.values()),
                "successful": by.get("ok", 0),
                "failed": by.get("failed", 0),
                "by_result": by,
                "last_sync_at": format_time(stats["last_sync_at"])
                if stats["last_sync_at"]
                else None,
            },
            "warnings": security_warnings(self.config),
            "problems": problems,
            "migration": self.store.migration(),
            "dry_run": self.config.sync.dry_run,
            # the dashboard cannot sign in: it hides its buttons
            "read_only": not self.config.auth_username,
            "reconcile": None if self.reconciler is None else self.reconciler.progress,
            "recent_check": self.recent_check_status(),
        }

    def recent_check_status(self) -> dict:
        """The recent check: how often, when each server was last checked, what it found and
        costs."""
        every = self.config.reconcile.recent_check_seconds
        rc = self.recent_check
        if rc is None or not every:
            return {"every_seconds": 0}
        return {
            "every_seconds": every,
            "last_run": {n: format_time(t) for n, t in rc.last_run.items()},
            "changes_found": rc.news,
            "cost_per_minute_per_person_and_server": rc.cost_per_minute(),
        }

    def _cached(self, key: str, compute: Any) -> Any:
        """Figures that count whole tables (the history, the item index): computed at most every
        HISTORY_CACHE_SECONDS, so open dashboards do not rescan them every refresh."""
        now = time.monotonic()
        hit = self._history_cache.get(key)
        if hit is None or hit[0] <= now:
            hit = self._history_cache[key] = (now + HISTORY_CACHE_SECONDS, compute())
        return hit[1]

    def database_status(self, queue: dict) -> dict:
        items = self._cached("count_items", self.store.count_items)
        return {
            "connected": True,
            "item_cache_by_server": items,
            "item_cache_total": sum(items.values()),
            "pending_events_count": queue["pending_events"],
            "sync_log_entries": self._cached("count_log", self.store.count_log),
            "user_mappings_count": len(self.store.all_users()),
            "database_size_bytes": _db_size(self.store.path),
        }

    def api_setup_webhook(self, name: str) -> Answer:
        """Add or update our destination in that server's Webhook plugin. The address Jellyfin
        should post to: {"public_url": …} (the dashboard sends the address it was opened at),
        else server.public_url."""
        if self.config.server(name) is None:
            return {"error": f"unknown server {name!r}"}, 404
        base = self.config.public_url or _json_body().get("public_url")
        if not base or not str(base).startswith(("http://", "https://")):
            return {
                "error": "the address Jellyfin reaches this service at is unknown: "
                "set server.public_url"
            }, 400
        result, message = PluginSetup(self.config, self.syncer.clients).run(name, str(base))
        if result == "error":
            return {"result": result, "message": message}, 502
        self.store.mark_webhook_setup(
            name
        )  # "unchanged" too: the person now waits for a first webhook
        return {"result": result, "message": message, **self._webhook_setup_json(name)}

    # "why isn't this synced?"
    def api_inspect(self) -> Answer:
        """An item, by title, on every server: whether it is there and how it was matched (or
        why not), and for ?person= their state on each server side by side, differences marked;
        the last writes concerning it and anything waiting or failed."""
        q = bottle.request.query
        text = (q.getunicode("q") or "").strip()
        if not text:
            return {"error": "say what to look for: ?q=<part of a title>"}, 400
        found = self.store.search_items(text)
        if not found:
            return {"query": text, "item": None, "candidates": []}
        chosen = next((i for i in found if q.get("item") == f"{i.server}:{i.item_id}"), found[0])
        person = name_key(q.getunicode("person") or "") or None
        return {
            "query": text,
            "candidates": [
                {"id": f"{i.server}:{i.item_id}", "name": self.syncer.library.display_name(i)}
                for i in found
            ],
            **self.inspection(chosen, person),
        }

    def inspection(self, item: ItemInfo, person: str | None) -> dict:
        library = self.syncer.library
        servers, group, accounts = [], {}, {}
        for s in self.config.servers:
            match, how = library.explain_match(item, s.name)
            entry: dict[str, Any] = {
                "server": s.name,
                "found": match is not None,
                "matched_by": how,
            }
            if match is not None:
                group[s.name] = match.item_id
                entry["item_id"] = match.item_id
            if person and match is not None:
                entry.update(self._person_state(s.name, person, match.item_id, accounts, item.type))
            servers.append(entry)
        shown = [f for f in EXPORTED if f.applies_to(item.type)]  # a show: its heart and rating
        fields = [f.name for f in shown]
        states = [e["state"] for e in servers if "state" in e]
        different = [f for f in fields if len({json.dumps(st.get(f)) for st in states}) > 1]
        jobs = self.store.jobs_by_status(
            ("pending", "waiting", "unreachable", "failed", "skipped"), 200, 0
        )
        return {
            "item": {
                "id": f"{item.server}:{item.item_id}",
                "name": library.display_name(item),
                "type": item.type,
            },
            "person": person,
            "servers": servers,
            # On one server alone: there is nothing to compare it with, nor to sync it to.
            "only_on": next(iter(group)) if len(group) == 1 and len(servers) > 1 else None,
            "different": different,
            "fields": [f.public() for f in shown],  # the rows the inspector shows, in order
            "open_changes": [self.job_json(j) for j in jobs if j.source_item_id in group.values()],
            "recent": [
                self._log_json(r) for r in self.store.sync_log(10, 0, item_name=item.name)[0]
            ],
        }

    def _person_state(
        self, server: str, person: str, item_id: str, accounts: dict, kind: str
    ) -> dict:
        try:
            user_id = self.syncer.library.user_id(server, person)
            if user_id is None:
                return {"state_error": f"no user {person!r} on {server}"}
            accounts[server] = user_id
            ud = self.syncer.clients[server].user_data(user_id, item_id)
        except (JellyfinError, SyncError) as e:
            return {"state_error": str(e)}
        return {"state": _user_data_entry(ud, kind)}

    def api_inspect_sync(self) -> Answer:
        """The inspector's "Sync this item now": reads every server, queues what differs."""
        body = _json_body()
        server, _, item_id = str(body.get("item") or "").partition(":")
        person = name_key(str(body.get("person") or ""))
        item = self.store.get_item(server, item_id) if server and item_id else None
        if item is None or not person or self.reconciler is None:
            return {"error": "give item (server:id, from /api/inspect) and person"}, 400
        group, accounts, holders = {}, {}, []
        for s in self.config.servers:
            match, _ = self.syncer.library.explain_match(item, s.name)
            user_id = self.syncer.library.user_id(s.name, person)
            if match is not None:
                holders.append(s.name)
            if match is not None and user_id is not None:
                group[s.name], accounts[s.name] = match.item_id, user_id
        if len(holders) == 1:  # the inspector does not offer it then; a script may still ask
            name = self.syncer.library.display_name(item)
            return {
                "error": f"{name} is only on {holders[0]}: there is no other server to sync it to "
                "(once it is added to another server's library, changes and passes sync it)",
                "only_on": holders[0],
            }, 409
        if len(group) < 2:
            return {
                "error": "the item and the person are on fewer than two servers: nothing to compare"
            }, 409
        try:
            report = self.reconciler.sync_item(person, group, accounts)
        except (JellyfinError, SyncError) as e:
            return {"error": str(e)}, 409
        changes = sum(e["count"] for per in report["users"].values() for e in per.values())
        return {"queued": changes, "servers": sorted(group)}

    # queue
    def api_jobs(self, state: str) -> Answer:
        """GET /api/events/<state>: a page of the jobs in that list (EVENT_LISTS)."""
        limit, offset = _limit_offset()
        jobs = self.store.jobs_by_status(EVENT_LISTS[state], limit, offset)
        return [self.job_json(job) for job in jobs]

    def job_json(self, job: Job) -> dict:
        """A queued change: the older program's keys and words, and ours beside them."""
        item = self.store.get_item(job.source, job.source_item_id)
        path = item.path_key if item else None
        return {
            "id": job.id,
            "event": job.extra.event,
            "field": job.field,
            "source_server": job.source,
            "target_server": job.target,
            "username": job.username,
            "item_name": job.item_name,
            "item_path": path,
            "value": job.value,
            "state": job.status,
            "state_word": STATE_WORDS.get(job.status, job.status).format(target=job.target),
            "field_word": FIELD_WORDS.get(job.field, job.field),
            "retry_count": job.attempts,
            "item_not_found_count": job.absent_count,
            "item_not_found_max": self.config.policy_for(path or "").absent_retry_count,
            "last_error": job.last_error,
            "created_at": format_time(job.queued_at),
            "next_retry_at": format_time(job.due_at),
            **older_job_keys(job),  # Older program
        }

    def api_retry(self, job_id: int) -> Answer:
        ok = job_id <= INT64_MAX and self.store.retry_job(job_id)
        if ok:
            self.syncer.wake_target(self.store.job_target(job_id))
            # a webhook that could not be planned goes back to the planner
            self.syncer.wake_planner()
        message = "queued for retry" if ok else NO_SUCH_JOB
        return {"success": ok, "message": message}, (200 if ok else 404)

    def api_retry_all(self) -> Answer:
        """Every failed change (and webhook) tried again now; resolved ones are not failed."""
        n, targets = self.store.retry_all()
        for target in targets:
            self.syncer.wake_target(target)
        self.syncer.wake_planner()
        return {"success": True, "retried": n, "message": f"{n} failed change(s) queued for retry"}

    def problem_rows(self, statuses: tuple[str, ...], since: float = 0.0) -> list[dict]:
        """The dashboard's "Waiting and failed": one row per action — the jobs of one webhook
        (or pass) for one person, item and target, with the same state — not one per field
        (a favourite click also reports the rating: two jobs, one thing the person did)."""
        rows: dict[tuple, dict] = {}
        for job in self.store.jobs_by_status(statuses, PROBLEM_ROWS, 0, since):
            key = (
                job.status,
                job.target,
                job.user_key,
                job.source,
                job.source_item_id,
                job.cause or job.id,
            )
            if key in rows:
                rows[key]["ids"].append(job.id)
                rows[key]["fields"].append(job.field)
            else:
                rows[key] = {**self.job_json(job), "ids": [job.id], "fields": [job.field]}
        for row in rows.values():
            row["fields"].sort(key=lambda f: FIELD_ORDER.get(f, -1))
        return list(rows.values())

    def api_discard(self, job_id: int) -> Answer:
        if job_id > INT64_MAX or not self.store.discard_job(job_id):
            return {"success": False, "message": NO_SUCH_JOB}, 404
        return {"success": True, "message": "discarded"}

    # reconciliation
    def api_reconcile_status(self) -> Answer:
        if self.reconciler is None:
            return {"error": NOT_RECONCILING}, 404
        return self.reconcile_json()

    def reconcile_json(self) -> dict | None:
        r = self.reconciler
        return (
            None
            if r is None
            else {
                "progress": r.progress,
                "last_report": r.last_report(),
                "last_dry_run": r.last_dry_run,
            }
        )

    def api_reconcile(self) -> Answer:
        if self.reconciler is None:
            return {"error": NOT_RECONCILING}, 404
        if self.reconciler.progress.get("running"):
            return {"error": "a pass is already running", "progress": self.reconciler.progress}, 409
        dry = bottle.request.query.get("dry_run", "") in ("1", "true", "yes")
        self.reconciler.request(dry)
        return {"status": "started", "dry_run": dry, "progress": "/api/reconcile"}, 202

    # history
    def timeline_json(self) -> dict:
        try:
            minutes = max(1, min(24 * 60, int(bottle.request.query.get("minutes", 180))))
        except ValueError:
            raise bottle.HTTPError(400, "minutes must be a whole number") from None
        return self.chart_json(minutes, 60)

    def chart_json(self, minutes: int, bucket: int) -> dict:
        """A chart's bars, with the server's time (the page places the bars by it, not by the
        browser's clock) and how many changes they hold."""
        now = utcnow()
        points = self.store.timeline(minutes, bucket, now)
        return {
            "minutes": minutes,
            "bucket": bucket,
            "now": format_time(now),
            "points": points,
            "total": sum(p["ok"] + p["failed"] + p["other"] for p in points),
        }

    def log_page_json(self, **fixed: Any) -> dict:
        """A page of the sync log, filtered as the query asks (and by ``fixed``)."""
        limit, offset = _limit_offset()
        # decode(): Bottle's query values are the URL's bytes read as Latin-1; a title searched
        # for ("Amélie") must be the text the person typed.
        filters = {**self._log_filters(bottle.request.query.decode()), **fixed}
        rows, total = self.store.sync_log(limit, offset, **filters)
        return {
            "entries": [self._log_json(r) for r in rows],
            "total": total,
            "limit": limit,
            "offset": offset,
        }

    # the safety net
    def _safety(self) -> SafetyNet:
        if self.safety is None:
            raise bottle.HTTPError(503, "not available in this mode")
        return self.safety

    def api_journal(self) -> Answer:
        """The journal: the sync log's writes, with their values before and after, searchable
        as /api/sync-log is (username, item_name, server, source, target, field, since, until,
        cause)."""
        return self.log_page_json(result="ok")

    def api_undo(self) -> Answer:
        """POST /api/undo {id | cause | user, server, source, since, until; dry_run}: a preview
        per server (dry_run, the default) or the undo itself, queued."""
        body = _json_body()
        scope = {k: body.get(k) for k in UNDO_SCOPE_KEYS}
        for key in ("since", "until"):
            if scope[key] not in (None, ""):
                scope[key] = _query_time(str(scope[key]), key)
        dry_run = body.get("dry_run", True) not in (False, "false", "0", 0)
        undo = self._safety().undo
        try:
            report = undo.preview(scope) if dry_run else undo.apply(scope)
        except SyncError as e:
            return {"error": str(e)}, 400
        report.pop("_changes", None)
        report["dry_run"] = dry_run
        return report, (200 if dry_run else 202)

    def api_held_list(self) -> Answer:
        return {"held": self._safety().brake.held()}

    def api_held(self, action: str) -> Answer:
        """POST /api/held/apply or /api/held/discard {source, user[, restore]}: one held group."""
        body = _json_body()
        source, user = str(body.get("source") or ""), str(body.get("user") or "")
        if self.config.server(source) is None or not user:
            return {"error": "give source (a server name) and user, as /api/held lists them"}, 400
        brake = self._safety().brake
        if action == "apply":
            return {"applied": brake.apply(source, user)}
        restore = body.get("restore", True) not in (False, "false", "0", 0)
        return brake.discard(source, user, restore)

    def alerts_json(self) -> dict:
        alerts = self._safety().alerts
        return {
            "destinations": [
                {"to": url_shown(u), "format": alert_format(u)[0]} for u in self.config.alerts.urls
            ],
            "healthchecks": url_shown(self.config.alerts.healthchecks_url),
            # The conditions now (also without destinations, when nobody is told of them).
            "active": [
                {"condition": k, "message": v} for k, v in sorted(alerts.conditions().items())
            ],
            "recent": list(alerts.recent),
        }

    def api_alerts_test(self) -> Answer:
        if not self.config.alerts.urls:
            return {"error": "no alerts.urls in the config: add one (see the README's Alerts)"}, 409
        wait = self._last_alert_test + ALERT_TEST_SECONDS - time.monotonic()
        if wait > 0:  # a test posts to every destination: not a way to flood someone's phone
            return {"error": f"a test was sent just now: try again in {math.ceil(wait)} s"}, 429
        self._last_alert_test = time.monotonic()
        results = self._safety().alerts.test()
        return {"results": results}, (200 if all(r["ok"] for r in results) else 502)

    def api_fields(self) -> Answer:
        """The synced fields (the registry): name, label, what they belong to, switched on?"""
        return {
            "fields": [
                {**f.public(), "enabled": self.config.syncs(f.name)} for f in REGISTRY.values()
            ]
        }

    def api_dashboard(self) -> Answer:
        """Everything the dashboard shows, in one answer (one request per refresh, not seven):
        the sync log takes the same query parameters as /api/sync-log, the chart ?minutes=."""
        resolved = self.problem_rows(("resolved",), since=utcnow() - DAY)  # shown for a day
        return {
            "status": self.status_json(),
            "timeline": self.timeline_json(),
            "hourly": self.chart_json(24 * 60, HOUR),
            "log": self.log_page_json(),
            "waiting": self.problem_rows(("waiting", "unreachable")),
            "failed": self.problem_rows(("failed", "skipped")) + resolved,
            "users": self.users_json(),
            "reconcile": self.reconcile_json(),
            "held": self.safety.brake.held() if self.safety else [],
            "alerts": self.alerts_json() if self.safety else None,
            "words": WORDS,
        }

    @staticmethod
    def _log_filters(q: Any) -> dict:
        """Our filters, and the older program's names for them (source_server, event_type, …)."""
        filters = {
            k: q.get(k)
            for k in ("source", "target", "server", "username", "result", "field", "item_name")
        }
        older_log_filters(q, filters)  # Older program
        if q.get("success") in ("true", "false", "1", "0"):
            filters["success"] = q.get("success") in ("true", "1")
        for key in (
            "since",
            "until",
        ):  # a time range: ISO dates ("2026-11-30T18:00", Z or an offset)
            if q.get(key):
                filters[key] = _query_time(q.get(key), key)
        filters["cause"] = q.get("cause")
        return filters

    @staticmethod
    def _log_json(r: LogEntry) -> dict:
        return {
            **dataclasses.asdict(r),
            "at": format_time(r.at),
            "result_word": RESULT_WORDS.get(r.result, r.result),
            "field_word": FIELD_WORDS.get(r.field, r.field),
            **older_log_keys(r),  # Older program
        }

    def metrics(self) -> str:
        """Prometheus text format, written by hand (no client library on a NAS)."""
        bottle.response.content_type = "text/plain; version=0.0.4; charset=utf-8"
        return "\n".join(Metrics(self.store, self.syncer, self.ready).lines()) + "\n"

    # users
    def users_json(self) -> dict:
        """Which user exists on which server (from the cached user index)."""
        names = [s.name for s in self.config.servers]
        people: dict[str, dict] = {}
        for row in self.store.all_users():
            person = self.config.person(row.server, row.name)
            entry = people.setdefault(
                person, {"person": person, "name": row.name, "username": row.name, "servers": {}}
            )
            slot = entry["servers"].setdefault(row.server, [])
            slot.append({"name": row.name, "id": row.user_id, "admin": bool(row.is_admin)})
        users = []
        for entry in sorted(people.values(), key=lambda e: e["person"]):
            duplicates = [srv for srv, accounts in entry["servers"].items() if len(accounts) > 1]
            users.append(
                {
                    **entry,
                    "servers": {n: entry["servers"].get(n, [None])[0] for n in names},
                    "synced": self.config.user_synced(entry["person"]),
                    "duplicates_on": duplicates,
                }
            )
        return {"servers": names, "users": users, "passwords_pending": self.store.count_passwords()}

    def _require_api_token(self) -> None:
        """Generated passwords are shown only to a caller holding server.api_token."""
        if not self.config.api_token:
            raise bottle.HTTPError(
                403, "set server.api_token in the config to read generated passwords"
            )
        if not _secret_matches(_bearer(bottle.request.environ), self.config.api_token):
            raise bottle.HTTPError(401, "send 'Authorization: Bearer <server.api_token>'")

    def api_passwords(self) -> Answer:
        self._require_api_token()
        bottle.response.set_header("Cache-Control", "no-store")
        return [
            {
                "id": r.id,
                "server": r.server,
                "username": r.username,
                "password": r.password,
                "created_at": format_time(r.created_at),
            }
            for r in self.store.passwords()
        ]

    def api_ack_password(self, password_id: int) -> Answer:
        self._require_api_token()
        if password_id > INT64_MAX or not self.store.ack_password(password_id):
            return {"error": "no pending password with that id"}, 404
        return {"success": True, "message": "password erased"}

    # the dashboard
    def index(self) -> Any:
        if (STATIC_ROOT / "index.html").exists():
            return bottle.static_file("index.html", root=str(STATIC_ROOT))
        return {"name": "jellyfin-db-sync", "version": __version__, "status": "/api/status"}


MAX_QUERY_CHARS = (
    1000  # a query parameter's value: a title or a name, never more (SQLite's LIKE has a limit)
)


def request_problem(environ: dict) -> str | None:
    """What makes a request unreadable before any route sees it, in words for a 400; None if
    nothing. PEP 3333 hands the URL and headers over as latin-1: bytes that are not UTF-8 there
    would make Bottle drop them silently ("/webhook/%FF" became "/webhook/") or fail."""
    try:
        environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8")
    except UnicodeError:
        return "the URL is not UTF-8"
    for key, value in environ.items():
        if key.startswith("HTTP_") and isinstance(value, str):
            try:
                value.encode("latin-1").decode("utf-8")
            except UnicodeError:
                return f"header {key[5:].replace('_', '-').title()}: not UTF-8"
    for name, value in urllib.parse.parse_qsl(
        environ.get("QUERY_STRING", ""), keep_blank_values=True
    ):
        if len(value) > MAX_QUERY_CHARS:
            return f"{_shorten(name)}: at most {MAX_QUERY_CHARS} characters"
    return None


def checked_call(app: Any, environ: dict, start_response: Any) -> Any:
    """Call a Bottle ``app`` the way both of ours are called: security headers on every answer,
    an unreadable request refused (request_problem) before any route sees it, and Bottle's raw
    traceback copies dropped (its JSON error handler logs each error as one line)."""
    secured = _with_security_headers(start_response)
    problem = request_problem(environ)
    if problem:
        body = json.dumps({"error": "400 Bad Request", "detail": problem}).encode()
        secured(
            "400 Bad Request",
            [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
        )
        return [body]
    return app(_quiet_errors(environ), secured)


class _Discard:
    """A wsgi.errors that keeps nothing: Bottle writes each traceback there as well, while the
    JSON error handler already logs it as one log line (one line, one event)."""

    def write(self, _text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def _quiet_errors(environ: dict) -> dict:
    environ["wsgi.errors"] = _Discard()
    return environ


class JsonBottle(bottle.Bottle):
    """Our Bottle app: routes answer JSON through JsonAnswers; every error, ours or Bottle's
    (404, 405, 413, 500), is JSON for scripts and the page, and an unexpected one is logged as
    one line with its traceback."""

    def __init__(self) -> None:
        super().__init__(catchall=True)
        self.uninstall(bottle.JSONPlugin)
        self.install(JsonAnswers())

    def default_error_handler(self, res: bottle.HTTPError) -> str:
        bottle.response.content_type = "application/json"
        if res.status_code >= 500 and res.traceback:
            log.error(
                "%s %s: unexpected error\n%s",
                bottle.request.method,
                bottle.request.path,
                res.traceback,
            )
            return json.dumps({"error": res.status_line, "detail": "see the service's log"})
        detail = res.body if isinstance(res.body, str) else None
        return json.dumps({"error": res.status_line, "detail": detail})


# How a typed time must look, said by the API and the command line alike (typed_time).
TIME_FORMAT = "a date and time like 2026-11-30T18:00 (UTC) or 2026-11-30T18:00+01:00"


def _query_time(text: str, key: str) -> float:
    """A time a person typed in a query or a form: ISO 8601, in UTC unless it says otherwise."""
    when = typed_time(text)
    if when is None:
        raise bottle.HTTPError(400, f"{key}: {TIME_FORMAT}")
    return when


def typed_time(text: str) -> float | None:
    """A time a person typed (a form, a query, the command line): ISO 8601 with or without
    seconds or a time of day, in UTC unless it names an offset; None if it is not one."""
    try:
        parsed = datetime.fromisoformat(text.strip())
        # In UTC, as it is stored and shown: 9999-12-31T23:59-14:00 would be in the year 10000,
        # which no date can be written as.
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC).timestamp()
    except (ValueError, OverflowError):
        return None


def rejection_hint(status: int, reason: str) -> str:
    """What to do about a refused webhook, in the plugin's own words."""
    if status == 401:
        return (
            "The plugin's X-Webhook-Token header does not match this server's webhook token "
            "(servers[].webhook_token, else server.webhook_token): press 'Set up webhooks' on the "
            "dashboard, or copy the token into that header in the plugin's destination."
        )
    if "JSON" in reason or "UTF-8" in reason or "Send All Properties" in reason:
        return (
            "Turn on 'Send All Properties' in the plugin's destination: a custom template usually "
            "sends text that is not JSON."
        )
    if status == 413:
        return "The body is far larger than the plugin's: is something else posting to this URL?"
    return "A value the sync cannot use; the reason says which."


def _request_json() -> Any:
    """The request's body as JSON (None if it is not sent as JSON); 400 for one nested too deeply
    to parse (json.loads of thousands of nested [ or {)."""
    try:
        return bottle.request.json
    except RecursionError:
        raise bottle.HTTPError(
            400, "body: nested too deeply (expected a JSON object of plain values)"
        ) from None


def _json_body() -> dict:
    """A request's JSON object (or {}): what the dashboard and scripts post."""
    body = _request_json() if bottle.request.content_type.startswith("application/json") else None
    return body if isinstance(body, dict) else {}


class JsonAnswers:
    """Bottle plugin: a route returns its answer's data (an Answer), and here, once, it becomes
    the JSON response; anything else a route returns (a page, a file, text) is passed on as it
    is. It takes the place of Bottle's own JSONPlugin, which knows neither lists nor statuses."""

    name = "json_answers"
    api = 2

    def apply(self, callback: Any, route: Any) -> Any:
        def answered(*args: Any, **kwargs: Any) -> Any:
            out = callback(*args, **kwargs)
            data, status = out if isinstance(out, tuple) else (out, 200)
            if not isinstance(data, dict | list):
                return out
            bottle.response.status = status
            bottle.response.content_type = "application/json"
            return json.dumps(data, default=str)

        return answered


def _limit_offset() -> tuple[int, int]:
    """?limit= (1–500, default 50) and ?offset= of the list endpoints."""
    try:
        limit = max(1, min(500, int(bottle.request.query.get("limit", 50))))
        offset = max(0, int(bottle.request.query.get("offset", 0)))
    except ValueError:
        raise bottle.HTTPError(400, "limit and offset must be whole numbers") from None
    if offset > INT64_MAX:
        raise bottle.HTTPError(400, f"offset must be at most {INT64_MAX}")
    return limit, offset


class Readiness:
    """Why this service cannot take and pass on webhooks now ([] = it can), checked at most
    every READY_CACHE_SECONDS, within half a second, one check at a time (the others answer
    from the last one): probes must never pile up on a locked file and hold the request threads
    webhooks need. Unreachable Jellyfin servers are not a reason: webhooks from the others must
    keep arriving (the plugin never retries); those show in /api/status and /metrics."""

    def __init__(self, store: Store, syncer: Syncer, threads: Any):
        self.store = store
        self.syncer = syncer
        self.threads = threads  # () → the service's SupervisedThreads
        self._at = -READY_CACHE_SECONDS
        self._reasons: list[str] = []
        self._lock = threading.Lock()

    def reasons(self) -> list[str]:
        if self._lock.acquire(blocking=False):
            try:
                if time.monotonic() - self._at >= READY_CACHE_SECONDS:
                    self._reasons = self._check()
                    self._at = time.monotonic()
            finally:
                self._lock.release()
        return list(self._reasons)

    def _check(self) -> list[str]:
        reasons = [] if self.syncer.threads else ["workers not started"]
        try:
            self.store.check_writable()
            age = self.store.oldest_unplanned_age()
        except StoreError as e:
            reasons.append(f"database not writable: {e}")
            age = 0.0
        dead = [t.name for t in self.threads() if not t.alive()]
        if dead:
            reasons.append(f"thread stopped (being restarted): {', '.join(dead)}")
        if self.syncer.planner_error:
            reasons.append(f"webhooks cannot be planned: {self.syncer.planner_error}")
        elif age > STUCK_SECONDS:
            reasons.append(f"stuck: the oldest unplanned webhook arrived {age:.0f} s ago")
        return reasons


class Metrics:
    """/metrics in Prometheus' text format, one method per family of series."""

    def __init__(self, store: Store, syncer: Syncer, ready: Readiness):
        self.store = store
        self.syncer = syncer
        self.ready = ready
        self.out: list[str] = []

    def lines(self) -> list[str]:
        self._counters()
        self._queue()
        self._servers()
        self._delays()
        return self.out

    def sample(self, series: str, labels: dict, value: float) -> None:
        lab = ",".join(f'{k}="{_prom_escape(str(v))}"' for k, v in labels.items())
        self.out.append(
            f"jellyfin_db_sync_{series}{{{lab}}} {value}"
            if lab
            else f"jellyfin_db_sync_{series} {value}"
        )

    def metric(self, name: str, kind: str, help_: str, samples: list[tuple[dict, float]]) -> None:
        self.out.append(f"# HELP jellyfin_db_sync_{name} {help_}")
        self.out.append(f"# TYPE jellyfin_db_sync_{name} {kind}")
        for labels, value in samples:
            self.sample(name, labels, value)

    def _counters(self) -> None:
        self.metric(
            "build_info", "gauge", "The running version (always 1)", [({"version": __version__}, 1)]
        )
        counters = [(k.split("|"), v) for k, v in self.syncer.counters.snapshot().items()]
        hooks = [({"server": k[1], "type": k[2]}, v) for k, v in counters if k[0] == "webhooks"]
        results = [({"target": k[1], "result": k[2]}, v) for k, v in counters if k[0] == "sync"]
        self.metric(
            "webhooks_received_total",
            "counter",
            "Webhooks received since start, by server and type",
            hooks,
        )
        self.metric(
            "sync_results_total",
            "counter",
            "Applied jobs since start, by target and result",
            results,
        )

    def _queue(self) -> None:
        jobs = [({"state": k}, v) for k, v in sorted(self.store.job_counts().items())]
        self.metric("jobs", "gauge", "Jobs in the queue by state", jobs)
        unplanned = self.store.count_unplanned()
        self.metric(
            "inbox_unplanned", "gauge", "Webhooks stored but not yet planned", [({}, unplanned)]
        )
        self.metric(
            "inbox_oldest_unplanned_age_seconds",
            "gauge",
            "Age of the oldest webhook not yet planned (0: none); above 60 the pipeline is stuck",
            [({}, round(self.store.oldest_unplanned_age(), 3))],
        )
        age = self.store.oldest_live_job_age()
        self.metric(
            "oldest_job_age_seconds",
            "gauge",
            "Age of the oldest pending job",
            [({}, round(age or 0.0, 3))],
        )
        restarts = [({"thread": t.name}, t.restarts) for t in self.ready.threads()]
        self.metric(
            "thread_restarts_total",
            "counter",
            "Times a thread of the service died and was restarted",
            restarts,
        )

    def _servers(self) -> None:
        health = self.syncer.health.items()
        self.metric(
            "server_up",
            "gauge",
            "1 if the server answered its last check and took our API key",
            [({"server": n}, 1 if h["healthy"] else 0) for n, h in health],
        )
        self.metric(
            "server_request_latency_seconds",
            "gauge",
            "Latency of the server's last status check (how long changes take: sync_delay_seconds)",
            [({"server": n}, round((h["latency_ms"] or 0) / 1000, 4)) for n, h in health],
        )
        self.metric(
            "server_requests_total",
            "counter",
            "REST requests made to the server since start",
            [({"server": n}, c.requests) for n, c in self.syncer.clients.items()],
        )

    def _delays(self) -> None:
        self.metric(
            "sync_delay_seconds",
            "histogram",
            "Time from a change being queued to its write on the target (debounce included)",
            [],
        )
        for target, (counts, total, count) in sorted(self.syncer.counters.delays().items()):
            running = 0
            for bound, n in zip((*DELAY_BUCKETS, "+Inf"), counts, strict=True):
                running += n
                self.sample("sync_delay_seconds_bucket", {"target": target, "le": bound}, running)
            self.sample("sync_delay_seconds_sum", {"target": target}, round(total, 3))
            self.sample("sync_delay_seconds_count", {"target": target}, count)


class Setup:
    """Setup mode: started with no usable configuration (none, or the starter's placeholders),
    the program stays up — /healthz 200, /readyz 503 "not configured" — and serves a setup
    page instead of exiting into a restart loop. Anyone on the network could reach that page
    first, so every setup call needs the one-time code printed in the log (as Jupyter does).
    Saving writes the config file atomically, readable by its owner only, and hands the new
    Config to ``on_saved``, which starts syncing without a restart.

    Given the running service's ``settings`` (a Config), the same page edits them later, on the
    dashboard's /setup: signed in (the Guard checks the sign-in instead of a setup code), keys
    left empty are kept, and ``on_saved`` puts a service built from the new file in place of the
    running one (ServiceSwitch), without a restart."""

    def __init__(self, path: str, on_saved: Any, problem: str = "", settings: Config | None = None):
        self.path = path
        self.on_saved = on_saved
        self.problem = problem  # why we are in setup mode, shown on the page
        self.settings = settings
        self._save_lock = threading.Lock()  # one save at a time; guards started
        self.started = False  # a save started the service: never a second one
        self.code = "-".join(secrets.token_hex(2) for _ in range(3))
        self.failures = Failures()  # wrong setup codes, per address
        self.app = JsonBottle()
        a = self.app
        a.route("/healthz", "GET", _healthz)
        a.route("/favicon.ico", "GET", _favicon)
        a.route("/readyz", "GET", self.readyz)
        a.route("/", "GET", self.page)
        a.route("/static/<path:path>", "GET", _static)
        a.route("/api/setup", "GET", self.describe)
        a.route("/api/setup/test", "POST", self.test_server)
        a.route("/api/setup/save", "POST", self.save)
        a.route("/api/status", "GET", self.status)

    def __call__(self, environ: dict, start_response: Any) -> Any:
        return checked_call(self.app, environ, start_response)

    @staticmethod
    def readyz() -> Answer:
        return {"status": "not ready", "reasons": ["not configured"]}, 503

    @staticmethod
    def status() -> Answer:
        return {"status": "setup", "version": __version__, "setup": True}

    @staticmethod
    def page() -> Any:
        """The setup page, never cached: once saved, "/" is the dashboard."""
        response = _static("setup.html")
        response.set_header("Cache-Control", "no-store")
        return response

    def describe(self) -> Answer:
        """What the page needs: where the file goes, and the settings variables already make
        (shown read-only: a variable wins over the file)."""
        fixed = {s.env: s.key for s in SETTINGS if s.env and os.environ.get(s.env, "").strip()}
        fixed.update(
            {
                k: "servers"
                for k in os.environ
                if k.startswith("JDS_SERVER_") and os.environ[k].strip()
            }
        )
        answer = {
            "config_path": str(Path(self.path).absolute()),
            "problem": self.problem,
            "from_environment": sorted(fixed.items()),
            "version": __version__,
            "mode": "settings" if self.settings else "setup",
        }
        if self.settings:  # what is set now: never a key, token or password, only whether it is set
            c = self.settings
            answer["servers"] = [
                {"name": x.name, "url": x.url, "passwordless": x.passwordless} for x in c.servers
            ]
            answer["set"] = {
                "webhook_token": bool(c.webhook_token),
                "auth": bool(c.auth_username),
                "api_token": bool(c.api_token),
            }
        return answer

    def _body(self) -> dict:
        """The request's JSON, once the setup code checks out (403 otherwise)."""
        if not self.settings:  # the dashboard's settings: the Guard has checked the sign-in
            self._check_code()
        body = _request_json()
        if not isinstance(body, dict):
            raise bottle.HTTPError(400, "expected a JSON object")
        return body

    def _check_code(self) -> None:
        """The setup code from the log, or 403; after SIGN_IN_FAILURES wrong ones from an address,
        429 for a while, right code or not (a guess during the wait tells nothing)."""
        address = bottle.request.environ.get("REMOTE_ADDR", "?")
        wait = self.failures.locked_out(address)
        if wait:
            raise _json_response(
                429, {"error": f"too many wrong setup codes: try again in {wait} s"}
            )
        if not _secret_matches(bottle.request.headers.get("X-Setup-Code", "").strip(), self.code):
            self.failures.failed(address, "setup code")
            raise _json_response(
                403, {"error": "wrong or missing setup code: it is printed in the service's log"}
            )

    def test_server(self) -> Answer:
        """The Test button: can this URL and API key be used? Name, version and users, or why
        not."""
        body = self._body()
        known = self.settings.server(str(body.get("name") or "")) if self.settings else None
        try:
            server = _parse_server(
                {
                    "name": body.get("name") or "test",
                    "url": body.get("url") or "",
                    # Settings: a key left empty is the one that server has now.
                    "api_key": body.get("api_key") or (known.api_key if known else ""),
                },
                "server",
                set(),
            )
            client = JellyfinClient(server, timeout=5)
            info = client.info()
            users = client.users()
        except (ConfigError, JellyfinError) as e:
            return {"ok": False, "error": f"{e}{refused_hint(e)}"}
        return {
            "ok": True,
            "name": info.get("ServerName"),
            "version": info.get("Version"),
            "users": len(users),
        }

    def save(self) -> Answer:
        body = self._body()
        with self._save_lock:  # two saves at once would write the file twice and start twice
            if self.started and not self.settings:
                return {
                    "ok": False,
                    "error": "already saved: syncing has started; reload the page",
                }, 409
            # Settings the page does not show (api_token, auth, database.path, every section
            # of a file that was refused for one value) are kept: the page's values go over them.
            existing = self._existing()
            page = self._config_data(body, self.path)
            if not page["servers"]:
                return {
                    "ok": False,
                    "error": "servers: at least one server, with its URL and API key",
                }, 400
            if self.settings:
                page["servers"] = self._keys_kept(page["servers"], existing)
            data = self._kept(existing, page)
            try:
                merged = copy.deepcopy(data)
                apply_env(merged, dict(os.environ))
                parse_config(merged, self.path)  # the same checks as at start-up, before writing
            except ConfigError as e:
                return {"ok": False, "error": f"{e} (in {self.path} or on this page)"}, 400
            kept = keep_beside(self.path)
            _write_private(self.path, yaml_dump(data))
            config = load_config(self.path)
            log.info(
                "%s: configuration saved to %s%s; %s",
                "settings" if self.settings else "setup",
                self.path,
                f" (the file it replaced is kept as {kept})" if kept else "",
                "applying it" if self.settings else "starting to sync",
            )
            try:
                self.on_saved(config)
            except (
                StoreError
            ) as e:  # the database folder cannot be written, say: said, with the fix
                log.error("setup: %s", e)
                return {
                    "ok": False,
                    "error": f"saved to {self.path}, but syncing cannot start: {e}",
                }, 500
            self.started = True
        done = "applied, without a restart" if self.settings else "syncing has started"
        return {"ok": True, "message": f"saved to {self.path}; {done}"}

    def _keys_kept(self, servers: list[dict], existing: dict) -> list[dict]:
        """Settings: a server whose key was left empty keeps the one it has (in the file, or
        the running config: the page never sees a key)."""
        in_file = {
            str(x.get("name")): x.get("api_key")
            for x in existing.get("servers") or []
            if isinstance(x, dict) and x.get("api_key")
        }
        out = []
        for server in servers:
            if not server.get("api_key"):
                known = (
                    self.settings.server(str(server.get("name") or "")) if self.settings else None
                )
                key = in_file.get(str(server.get("name"))) or (known.api_key if known else None)
                server = {**server, "api_key": key} if key else server
            out.append(server)
        return out

    def _existing(self) -> dict:
        """The file there now, as data (a file that is not YAML mapping: nothing to keep)."""
        import yaml

        try:
            data = yaml.safe_load(Path(self.path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return {}
        return data if isinstance(data, dict) else {}

    @staticmethod
    def _kept(existing: dict, page: dict) -> dict:
        """The page's settings over the file's: its servers replace the file's, its webhook
        token and sign-in go into the file's ``server`` section, and the file's database path
        (and everything else) stays."""
        data = copy.deepcopy(existing)
        data["servers"] = page["servers"]
        if page.get("server"):
            section = data.get("server") if isinstance(data.get("server"), dict) else {}
            data["server"] = {**section, **page["server"]}
        database = data.get("database") if isinstance(data.get("database"), dict) else {}
        data["database"] = {**page["database"], **database}
        return data

    @staticmethod
    def _config_data(body: dict, path: str) -> dict:
        servers = [
            {
                k: v.strip() if isinstance(v, str) else v  # a pasted key often ends in a line break
                for k, v in server.items()
                if k in ("name", "url", "api_key", "passwordless") and v not in (None, "")
            }
            for server in body.get("servers") or []
            if isinstance(server, dict)
        ]
        server: dict[str, Any] = {}
        if body.get("webhook_token"):
            token = body["webhook_token"]
            server["webhook_token"] = token.strip() if isinstance(token, str) else token
        if body.get("auth_username") or body.get("auth_password"):
            server["auth"] = {
                "username": body.get("auth_username", ""),
                "password": body.get("auth_password", ""),
            }
        if body.get("api_token"):  # for scripts and Prometheus (Authorization: Bearer …)
            token = body["api_token"]
            server["api_token"] = token.strip() if isinstance(token, str) else token
        data: dict[str, Any] = {
            "servers": servers,
            "database": {"path": _default_database_path(path)},
        }
        if server:
            data["server"] = server
        return data


def _static(path: str) -> Any:
    return bottle.static_file(path, root=str(STATIC_ROOT))


def _stylesheet() -> Any:
    return _static("style.css")


def _favicon() -> Any:
    """The icon (also the unRAID template's): an SVG, which every current browser shows."""
    return bottle.static_file("icon.svg", root=str(STATIC_ROOT), mimetype="image/svg+xml")


def _healthz() -> str:
    """Liveness: the process answers (as text, like the service's own /healthz)."""
    bottle.response.content_type = "text/plain; charset=utf-8"
    return "ok"


def yaml_dump(data: dict) -> str:
    import yaml

    return (
        "# Written by jellyfin-db-sync's setup page; every key is explained in "
        "config.example.yaml.\n" + (yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    )


@contextmanager
def private_file(path: str) -> Iterator[Any]:
    """A text file to write that replaces ``path`` atomically once the block ends without an
    error (a crash leaves the old file or the new one, never half), readable by its owner
    only: config files hold API keys, exports people's histories. It is first written under a
    new name of its own (mkstemp: O_EXCL, 0600, random): never a file or symlink planted
    there, never another writer's."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(name, target)
    finally:
        with suppress(FileNotFoundError):
            os.unlink(name)


def _write_private(path: str, text: str) -> None:
    """Write a whole file atomically, its owner's only (see private_file)."""
    with private_file(path) as f:
        f.write(text)


def keep_beside(path: str) -> str | None:
    """Copy the file at ``path`` beside itself with the time in its name
    (``config.yaml.20261204-104800.bak``,
    its owner's only) before it is replaced; None if there is none."""
    source = Path(path)
    if not source.is_file():
        return None
    kept = f"{path}.{datetime.now(UTC).strftime('%Y%m%d-%H%M%S-%f')}.bak"
    _write_private(kept, source.read_text(encoding="utf-8", errors="replace"))
    return kept


def _default_database_path(config_path: str) -> str:
    """In the Docker image /data is the database volume; elsewhere, beside the config file."""
    if os.path.isdir("/data"):
        return "/data/jellyfin-db-sync.db"
    return str(Path(config_path).absolute().parent / "jellyfin-db-sync.db")


SECURITY_README = "the README's 'Security and safety' (#security-and-safety)"


def read_only_reason(config: Config) -> str:
    """Why a change was refused when no sign-in is configured, and what to set."""
    if config.api_token:
        return (
            "read-only: changes need 'Authorization: Bearer <server.api_token>'; to make them from "
            f"the dashboard, set server.auth (username and password) — see {SECURITY_README}"
        )
    return (
        "read-only: no server.auth or server.api_token is set, so nobody may change anything. Set "
        "server.auth (username and password) to sign in to the dashboard, or server.api_token for "
        f"scripts — see {SECURITY_README}"
    )


def security_warnings(config: Config) -> list[str]:
    """What the dashboard warns about: the configuration's own warnings, then open doors."""
    out = [f"Configuration: {w}" for w in config.warnings]
    open_hooks = config.open_webhooks()
    if len(open_hooks) == len(config.servers):
        out.append("No server.webhook_token set: anyone on the network can post webhooks.")
    elif open_hooks:
        out.append(
            f"No webhook token for {', '.join(open_hooks)} (servers[].webhook_token or "
            "server.webhook_token): anyone on the network can post webhooks as that server."
        )
    if not config.auth_username:
        out.append(
            "No server.auth set: this dashboard is read-only (anyone on the network can look, "
            "nobody can change anything here). Set server.auth (username and password) to sign "
            "in — see "
            f"{SECURITY_README}."
        )
    return out


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark"><title>Sign in · jellyfin-db-sync</title>
<link rel="stylesheet" href="/static/style.css"></head>
<body><main class="login"><h1>jellyfin-db-sync</h1>{message}
<form method="post" action="/login">
<label>User name <input name="username" autocomplete="username" required autofocus></label>
<label>Password
<input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit">Sign in</button></form>
<p class="muted">The user name and password are <code>server.auth</code> in the config.</p>
</main></body></html>
"""


def _prom_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _bearer(environ: dict) -> str:
    """The token of an ``Authorization: Bearer …`` header, or ""."""
    auth = environ.get("HTTP_AUTHORIZATION") or ""
    return auth[7:].strip() if auth[:7].lower() == "bearer " else ""


def _secret_matches(given: str, expected: str) -> bool:
    """Constant-time comparison; an unset secret matches nothing."""
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def _token_ok(environ: dict, token: str) -> bool:
    """The plugin can only send fixed custom headers, or a secret in the URL (docs/jellyfin.md
    §1)."""
    query = urllib.parse.parse_qs(environ.get("QUERY_STRING") or "")
    given = (
        environ.get("HTTP_X_WEBHOOK_TOKEN") or _bearer(environ) or (query.get("token") or [""])[-1]
    )
    return _secret_matches(given, token)


# The dashboard uses no inline script or style, and is never framed (clickjacking).
SECURITY_HEADERS = [
    (
        "Content-Security-Policy",
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
]
# Names that only a local resolver answers: a DNS-rebinding page can never use them.
LOCAL_NAME_SUFFIXES = (".localhost", ".local", ".lan", ".home.arpa", ".internal")


def _with_security_headers(start_response: Any) -> Any:
    """A WSGI start_response that adds SECURITY_HEADERS to every answer, errors included: the
    one place they are set, for both apps (checked_call). Not a Bottle "after_request" hook:
    Bottle runs that before it builds the 500 page of an unexpected error, whose headers then
    replace the response's, and never for the 400 that checked_call gives before Bottle."""

    def secured(status: str, headers: list, exc_info: Any = None) -> Any:
        return start_response(status, headers + SECURITY_HEADERS, exc_info)

    return secured


def host_allowed(host: str, config: Config) -> bool:
    """May a request with this Host header use the dashboard and API when no sign-in is set?

    Yes for an IP address, localhost, a name with no dot (a Docker service or a NAS's own name),
    local-only suffixes (.local, .lan, …), the host of server.public_url and
    server.allowed_hosts ("*" allows any; ".example.com" a domain and its subdomains). A
    rebinding attack needs a public name of the attacker's, which is none of these.
    """
    name = host.strip().lower()
    if name.startswith("["):  # [IPv6]:port
        return True
    name = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
    name = name.rstrip(".")
    if not name or name == "localhost" or "." not in name or name.endswith(LOCAL_NAME_SUFFIXES):
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    if name == (urllib.parse.urlsplit(config.public_url).hostname or ""):
        return True
    return any(
        allowed == "*"
        or name == allowed
        or allowed.startswith(".")
        and (name.endswith(allowed) or name == allowed[1:])
        for allowed in config.allowed_hosts
    )


def client_key(address: str) -> str:
    """Whom failed sign-ins are counted against: an IPv4 address, or an IPv6 /64 (one home or
    one server gets a whole /64, so counting single IPv6 addresses would count nothing)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _db_size(path: str) -> int:
    try:
        return sum(os.path.getsize(path + s) for s in ("", "-wal") if os.path.exists(path + s))
    except OSError:
        return 0


# ── main ─────────────────────────────────────────────────────────────────────


_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class LogFormatter(logging.Formatter):
    """One event, one line: control characters in a message (a user or item name with a
    newline, sent by whoever can post a webhook) are written escaped, so nobody can forge a log
    line. Tracebacks, added after the message, keep their lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = _CONTROL_CHARS.sub(lambda m: repr(m.group())[1:-1], record.message)
        return super().formatMessage(record)


class EveryMinuteAtMost(logging.Filter):
    """Waitress warns "Task queue depth is N" for every request that waits for a free thread:
    during a burst that is hundreds of lines a second of the same news. It is news (the service
    is saturated), so it is kept — once a minute at most."""

    def __init__(self) -> None:
        super().__init__()
        self._next = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + 60.0
        return True


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(LogFormatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger("waitress.queue").addFilter(EveryMinuteAtMost())


def find_config_path(cli_path: str | None) -> str:
    if cli_path:
        return cli_path
    if os.environ.get("CONFIG_PATH"):
        return os.environ["CONFIG_PATH"]
    for p in DEFAULT_CONFIG_PATHS:
        if os.path.exists(p):
            return p
    return DEFAULT_CONFIG_PATHS[-1]


def keep_to_one_cpu(setting: str) -> int | None:
    """Opt-in (server.cpu: auto or a CPU number): run this process's threads on one CPU;
    returns it, or None if not pinned (the default, "any": the threads move freely).

    Python runs one thread at a time, so a busy service gains little from a second CPU, and some
    owners prefer to keep it off the CPUs their transcoder uses. Not the default: on a NAS that
    is transcoding on that CPU, a pinned service would wait for it. Linux applies this to the
    calling thread and every thread it starts later, so it runs before any other thread exists.
    """
    if setting == "any" or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if setting == "auto":
        if len(allowed) < 2:
            return None
        cpu = allowed[-1]  # CPU 0 tends to get more of the machine's interrupts
    else:
        cpu = int(setting)
        if cpu not in allowed:
            log.warning(
                "server.cpu: CPU %d is not available here (%s); running on any", cpu, allowed
            )
            return None
    os.sched_setaffinity(0, {cpu})
    return cpu


class PerAddressListener(socket.socket):
    """The socket the service listens on (given to Waitress through its documented ``sockets``
    argument): it keeps at most half the connections Waitress takes (``limit``) open from one
    client (an IPv4 address or an IPv6 /64) and closes the rest as soon as they arrive. One host
    holding a thousand idle or trickling connections then leaves the other half to everyone
    else, and a webhook from any other host is still taken in at once (the plugin never sends
    one again). Below that nothing is refused: a Jellyfin server's burst of concurrent webhooks
    all gets in."""

    limit = CONNECTION_LIMIT // 2  # connections one client may hold; make_waitress sets it

    @classmethod
    def on(cls, host: str, port: int) -> list[PerAddressListener]:
        """One listener per address ``host`` names (as Waitress' own ``listen`` would bind):
        "localhost" is ::1 and 127.0.0.1."""
        found = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        return [cls(family, address) for family, _, _, _, address in dict.fromkeys(found)]

    def __init__(self, family: int, address: tuple):
        super().__init__(family, socket.SOCK_STREAM)
        self.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.bind(address)
        self._open: collections.Counter[str] = collections.Counter()  # guarded by _open_lock
        self._open_lock = threading.Lock()
        self._said = Throttle()  # per client: its refusals are logged once a minute at most

    def accept(self) -> tuple[socket.socket, Any]:
        conn, address = super().accept()
        who = client_key(address[0]) if isinstance(address, tuple) else "local"
        with self._open_lock:
            full = self._open[who] >= self.limit
            if not full:
                self._open[who] += 1
        if full:
            conn.close()
            if self._said.due(who, 60.0):
                log.warning(
                    "connections from %s refused: it holds %d open already (at most a minute "
                    "apart, this line)",
                    who,
                    self.limit,
                )
            # Waitress takes this as a connection that went away before it was accepted.
            raise ConnectionAbortedError(errno.ECONNABORTED, f"too many connections from {who}")
        counted = _CountedConnection(conn.family, conn.type, conn.proto, fileno=conn.detach())
        counted.on_close = functools.partial(self._release, who)
        return counted, address

    def _release(self, who: str) -> None:
        with self._open_lock:
            self._open[who] -= 1
            if self._open[who] <= 0:
                del self._open[who]


class _CountedConnection(socket.socket):
    """An accepted connection that tells its listener when it is closed (once)."""

    on_close: Any = None

    def close(self) -> None:
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()
        super().close()


def connection_limit() -> int:
    """CONNECTION_LIMIT, or fewer where the open-files limit would not allow them (each is a
    descriptor; a NAS may allow only 1,024). The soft limit is first raised as far as the hard
    one allows, as servers do; 64 descriptors stay for the database, logs and our own requests."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = (
            CONNECTION_LIMIT + 64
            if hard == resource.RLIM_INFINITY
            else min(hard, CONNECTION_LIMIT + 64)
        )
        if wanted > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
    except (ImportError, ValueError, OSError):  # not on Linux or BSD, or not allowed: as it is
        return CONNECTION_LIMIT
    return max(64, min(CONNECTION_LIMIT, soft - 64))


class ListenError(Exception):
    """The address to listen on cannot be had (taken, not this machine's, a privileged port)."""


def make_waitress(
    app: Any,
    host: str,
    port: int,
    *,
    listeners: list[PerAddressListener] | None = None,
    socket_map: dict | None = None,
) -> Any:
    """The Waitress server every mode of the service runs behind; ListenError names the address
    and the settings that choose it when it cannot listen there. ``listeners`` already bound
    take the place of host and port; ``socket_map`` (Waitress' ``map`` argument) holds the
    connections it serves, for whoever has to close them."""
    import waitress

    limit = connection_limit()
    try:
        listeners = listeners or PerAddressListener.on(host, port)  # binds: a taken port shows
        for listener in listeners:
            listener.limit = limit // 2
        return waitress.create_server(
            app,
            map=socket_map,
            sockets=listeners,
            # one per concurrent sender before requests queue; handlers parse and queue
            threads=WEBHOOK_THREADS,
            ident="jellyfin-db-sync",
            max_request_body_size=MAX_BODY_BYTES + 1024,
            clear_untrusted_proxy_headers=True,
            # Waitress reads a whole request before a thread sees it, so slow senders hold no
            # thread, only a connection. Idle and trickling connections must not use up the
            # connections Jellyfin's webhooks need: many may be open (poll(), not select(), has
            # no 1,024-descriptor ceiling), and one idle this long is closed.
            connection_limit=limit,
            channel_timeout=CHANNEL_TIMEOUT,
            cleanup_interval=CHANNEL_TIMEOUT / 3,
            asyncore_use_poll=True,
        )
    except OSError as e:
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if e.errno == errno.EADDRINUSE:
            # 8080 is a popular port on a NAS: say which setting moves us, not a traceback.
            raise ListenError(
                f"cannot listen on {address}: the port is already in use by another program (or "
                "another "
                "copy of jellyfin-db-sync); choose a free port with server.port in the config file "
                "or "
                "JDS_PORT, and the same port in the plugin's webhook URL"
            ) from None
        raise ListenError(
            f"cannot listen on {address}: {e.strerror or e}; check server.host / JDS_HOST and "
            "server.port / JDS_PORT"
        ) from None


class Service:
    """Everything wired together: what main() runs and what tests start in-process."""

    def __init__(self, config: Config, config_path: str | None = None, replace: Any = None):
        """``config_path`` and ``replace`` (a ServiceSwitch's): the dashboard's /setup then edits
        that file, and a saved one replaces this service without a restart."""
        self.config = config
        self.store = Store(config.database_path, config.journal_mode)
        self.clients = {s.name: JellyfinClient(s) for s in config.servers}
        self.library = Library(config, self.store, self.clients)
        self.syncer = Syncer(config, self.store, self.library, self.clients)
        self.reconciler = Reconciler(config, self.store, self.library, self.syncer)
        self.recent_check = RecentCheck(config, self.store, self.library, self.syncer)
        self.safety = SafetyNet(config, self.store, self.syncer)
        self.reconciler.ping = self.safety.alerts.ping
        settings = Setup(config_path, replace, settings=config) if config_path and replace else None
        self.app = Web(
            config,
            self.store,
            self.syncer,
            self.reconciler,
            threads=self.threads,
            safety=self.safety,
            settings=settings,
        )
        self.safety.alerts.reasons = self.app.ready.reasons
        self.app.recent_check = self.recent_check
        self.alert_thread: SupervisedThread | None = None
        self.server = None
        self.supervisor: threading.Thread | None = None
        self._stopping = threading.Event()

    def start_workers(self) -> None:
        self.syncer.start()
        self.reconciler.start()
        if self.config.reconcile.recent_check_seconds:
            self.recent_check.start()
        if self.config.alerts.urls:
            self.alert_thread = SupervisedThread("alerts", self.safety.alerts.loop)
            self.alert_thread.start()
        self.supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        self.supervisor.start()

    def threads(self) -> list[SupervisedThread]:
        optional = [
            t
            for t in (self.reconciler.thread, self.recent_check.thread, self.alert_thread)
            if t is not None
        ]
        return [*self.syncer.threads, *optional]

    def _supervise(self) -> None:
        """Restart any thread that died (SupervisedThread says why and paces it)."""
        while not self._stopping.wait(SUPERVISE_SECONDS):
            for t in self.threads():
                try:
                    t.revive()
                except Exception:  # cannot start a thread (out of memory?): try again next round
                    log.exception("supervisor: cannot restart %s", t.name)

    def stop(self) -> None:
        self._stopping.set()
        self.safety.alerts.stop_event.set()
        self.syncer.stop()
        self.reconciler.stop()
        self.recent_check.stop()
        self.store.close()


def open_service(config: Config, path: str | None = None, replace: Any = None) -> Service | None:
    """A Service for the command line and serve(); None once why it cannot be built (its
    database: a folder it cannot write, a damaged or newer file) is said on stderr. The setup
    page builds its own through ServiceSwitch.run, and says that on the page instead."""
    try:
        return Service(config, path, replace)
    except StoreError as e:
        print(f"jellyfin-db-sync: {e}", file=sys.stderr)
        return None


def reconcile_cli(config: Config, dry_run: bool) -> int:
    """--reconcile [--dry-run]: one pass from the command line, with a progress line."""
    configure_logging(config.log_level)
    service = open_service(config)
    if service is None:
        return 1

    def show(p: dict) -> None:
        print(
            f"\r{p.get('phase', '')}: {p.get('users_done', 0)}/{p.get('users_total', 0)} users, "
            f"{p.get('items_compared', 0)} items compared, {p.get('changes_queued', 0)} changes "
            "queued   ",
            end="",
            file=sys.stderr,
            flush=True,
        )

    try:
        for s in config.servers:
            service.syncer.check_server(s.name)
        report = service.reconciler.run(dry_run=dry_run, on_progress=show)
        print(file=sys.stderr)
        if not dry_run and report["changes"]:
            _drain(service)  # apply the queued changes, then stop
    finally:
        service.stop()
    verb = "would change" if dry_run else "changed"
    print(f"{report['items_compared']} items compared; {report['changes']} {verb}")
    for person, servers in sorted(report["users"].items()):
        for server, entry in sorted(servers.items()):
            print(f"  {person} on {server}: {entry['count']}")
            for line in entry["sample"]:
                print(f"    {line}")
    for error in report["errors"]:
        print(f"  ! {error}")
    return 0


def _drain(service: Service, timeout: float = 600) -> None:
    """Apply what is queued (the command line's writers), then return."""
    service.syncer.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = service.store.job_counts()
        if not counts.get("pending") and not counts.get("running"):
            return
        time.sleep(0.2)


def safety_cli(config: Config, args: argparse.Namespace) -> int:
    """--undo, --export FILE, --import FILE --to SERVER: the safety net from the command line.
    Safe while the service runs (the queue is the database's); what is queued is applied here."""
    service = open_service(config)
    if service is None:
        return 1
    try:
        for s in config.servers:
            service.syncer.check_server(s.name)
        if args.export:
            return _export_cli(service, args)
        if args.import_file:
            return _import_cli(service, args)
        return _undo_cli(service, args)
    except (SyncError, OSError) as e:
        print(f"jellyfin-db-sync: {e}", file=sys.stderr)
        return 1
    finally:
        service.stop()


def _export_cli(service: Service, args: argparse.Namespace) -> int:
    data = Transfer(service.config, service.store, service.library, service.syncer.planner).export(
        {name_key(args.user)} if args.user else None
    )
    with private_file(args.export) as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
    for person, servers in sorted(data["people"].items()):
        print(
            f"{person}: "
            + ", ".join(f"{len(items)} items on {srv}" for srv, items in sorted(servers.items()))
        )
    print(f"written to {args.export}")
    return 0


def _import_cli(service: Service, args: argparse.Namespace) -> int:
    if not args.to or service.config.server(args.to) is None:
        raise SyncError("--import needs --to SERVER, a server name from the config")
    with open(args.import_file, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except ValueError as e:
            raise SyncError(f"{args.import_file}: not JSON ({e})") from None
        except RecursionError:
            raise SyncError(
                f"{args.import_file}: nested too deeply to be an export of ours"
            ) from None
    transfer = Transfer(service.config, service.store, service.library, service.syncer.planner)
    report = transfer.plan_import(data, args.to, args.user, args.dry_run)
    verb = "would change" if args.dry_run else "changing"
    for person, entry in report["people"].items():
        counts = ", ".join(f"{n} {fld}" for fld, n in sorted(entry["changes"].items())) or "nothing"
        print(
            terminal_safe(
                f"{person}: {entry['matched']} items found on {args.to}, {entry['not_found']} not; "
                f"{verb}: {counts}"
            )
        )
        for line in entry["sample"]:
            print(terminal_safe(f"    {line}"))
        if entry.get("error"):
            print(terminal_safe(f"  ! {entry['error']}"))
    if report["changes"] and not args.dry_run:
        _drain(service)
        held = service.store.count_held()
        print(
            f"{report['changes']} changes written ({report['cause']})"
            + (f"; {held} held by the brake" if held else "")
        )
    return 0


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def terminal_safe(text: str) -> str:
    """Names from a file or a server, printed to a terminal: control characters (an escape
    sequence could rewrite the screen or hide a line) are shown as \\x1b and the like."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def _undo_cli(service: Service, args: argparse.Namespace) -> int:
    scope = {
        "id": args.entry,
        "cause": args.cause,
        "user": args.user,
        "server": args.server,
        "source": args.source,
    }
    for key in ("since", "until"):
        text = getattr(args, key)
        if text:
            when = typed_time(text)
            if when is None:
                raise SyncError(f"--{key}: {TIME_FORMAT}")
            scope[key] = when
    undo = service.safety.undo
    report = undo.preview(scope) if args.dry_run else undo.apply(scope)
    print(f"{report['entries']} journal entries in scope; {report['changes']} to undo")
    for server, entry in sorted(report["servers"].items()):
        print(
            f"  {server}: {entry['undo']} to undo, {entry['changed_since']} changed since (kept), "
            f"{entry['already']} already as before"
        )
        for line in entry["sample"]:
            print(f"    {line}")
        for line in entry["refused"]:
            print(f"    kept: {line}")
    if report["afterwards"]:
        print("afterwards (passes leave these so until the person changes them again):")
    for server, lines in report["afterwards"].items():
        print(f"  {server}: " + "; ".join(lines))
    if not args.dry_run and report.get("undo"):
        _drain(service)
        print(f"undone ({report['undo']})")
    return 0


def env_help() -> str:
    """--help's list of environment variables, from the table of settings."""
    lines = [
        "environment variables (each also as VAR_FILE: read from a file, e.g. a Docker secret):"
    ]
    for field, (key, _) in SERVER_ENV_FIELDS.items():
        lines.append(f"  JDS_SERVER_<N>_{field:<16} servers[N-1].{key}")
    lines += [f"  {s.env:<31} {s.key}: {s.help}" for s in SETTINGS if s.env]
    lines.append(
        "  CONFIG_PATH                     the config file (default /config/config.yaml, "
        "./config.yaml)"
    )
    return "\n".join(lines)


def setting_value(config: Config, setting: Setting) -> Any:
    section, _, name = setting.key.partition(".")
    return (
        getattr(config, setting.attr) if setting.attr else getattr(getattr(config, section), name)
    )


def check_config(config: Config) -> int:
    """--check-config: print the effective config (secrets masked) and test every server."""
    for warning in config.warnings:
        print(f"✗ {warning}")
    print(
        f"configuration from {config.source}: "
        + ("valid" if not config.warnings else "usable, with the errors above")
    )
    shown = masked(config)
    for srv in shown["servers"]:
        print(
            f"  servers: {srv['name']} at {srv['url']}, api_key {srv['api_key']}"
            + (", passwordless" if srv["passwordless"] else "")
        )
    for setting in SETTINGS:
        value = setting_value(config, setting)
        if setting.kind in ("token", "password"):
            value = _mask(value)
        elif setting.kind == "urls":
            value = tuple(url_shown(u) for u in value)
        elif setting.kind == "secret_url":
            value = url_shown(value)
        mark = "" if value == setting.default else "   (changed)"
        print(f"  {setting.key}: {value if not isinstance(value, tuple) else list(value)}{mark}")
    path = config.database_path
    problem, kind, version = folder_problem(path), "ours", SCHEMA_VERSION
    if not problem:
        try:
            kind, version = examine_database(path)
        except StoreError as e:
            problem = str(e)
    if problem:
        print(f"✗ database: {problem}")
    elif not Path(path).exists():
        print(f"✓ database: {path} is created at start")
    elif kind == "older":  # Older program
        print(
            f"✓ database: {path} is the older jellyfin-db-sync's; moved over at start (copied "
            "beside itself first)"
        )
    elif version < SCHEMA_VERSION:
        print(
            f"✓ database: {path} (schema {version}) is upgraded to schema {SCHEMA_VERSION} at start"
        )
    else:
        print(f"✓ database: {path} can be used")
    failures = 1 if problem else 0
    for s in config.servers:
        client = JellyfinClient(s, timeout=5)
        try:
            info = client.info()
            users = client.users()  # needs a valid API key
            print(
                f"✓ {s.name}: Jellyfin {info.get('Version')} at {s.url}, API key accepted "
                f"({len(users)} users)"
            )
        except JellyfinError as e:
            failures += 1
            print(
                f"✗ {e}{refused_hint(e)}"
            )  # a JellyfinError already starts with the server's name
    return 1 if failures or config.warnings else 0


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="jellyfin_db_sync.py",
        description=__doc__.split("\n\n")[0],
        epilog=env_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", help="config file (default: $CONFIG_PATH, /config/config.yaml, ./config.yaml)"
    )
    parser.add_argument("--version", action="version", version=f"jellyfin-db-sync {__version__}")
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration, print it with secrets masked, test each server, "
        "and exit: "
        "0 all is well, 1 something is marked ✗ (a warning, the database, a server), 2 no usable "
        "config",
    )
    parser.add_argument(
        "--backup", metavar="FILE", help="copy the database to FILE (safe while the service runs)"
    )
    parser.add_argument(
        "--reconcile",
        action="store_true",
        help="compare every server now, queue and apply the differences, and exit",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="with --reconcile, --undo or --import: report, change nothing",
    )
    safety = parser.add_argument_group("safety net (README: Undo, Export and import)")
    safety.add_argument(
        "--undo", action="store_true", help="undo what we wrote in a scope (below); preview first"
    )
    safety.add_argument("--entry", type=int, metavar="N", help="--undo: one journal entry (its id)")
    safety.add_argument(
        "--cause", metavar="CAUSE", help="--undo: what one event or pass caused (event:12, pass:3)"
    )
    safety.add_argument("--server", metavar="NAME", help="--undo: what was written on this server")
    safety.add_argument("--source", metavar="NAME", help="--undo: what came from this server")
    safety.add_argument(
        "--since", metavar="TIME", help="--undo: from this time (2026-11-30T18:00, UTC)"
    )
    safety.add_argument("--until", metavar="TIME", help="--undo: up to this time")
    safety.add_argument(
        "--user", metavar="NAME", help="--undo, --export, --import: only this person"
    )
    safety.add_argument(
        "--export", metavar="FILE", help="write every person's watch history to FILE (JSON)"
    )
    safety.add_argument(
        "--import", dest="import_file", metavar="FILE", help="write FILE's watch history to --to"
    )
    safety.add_argument("--to", metavar="SERVER", help="--import: the server to write to")
    parser.add_argument(
        "--setup-webhooks",
        nargs="?",
        const="",
        metavar="URL",
        help="add or update our destination in each server's Webhook plugin, posting to "
        "URL/webhook/<name> "
        "(default: server.public_url), and exit",
    )
    parser.add_argument(
        "--healthcheck",
        action="store_true",
        help="exit 0 if the running service answers /healthz on its port (from the config or "
        "JDS_PORT), else 1",
    )
    return parser.parse_args(argv)


def drop_privileges(path: str, env: dict[str, str]) -> str | None:
    """The linuxserver way, for images started as root: with PUID (and PGID, UMASK) set, what is
    ours is given to that user and the process goes on as that user. Started as a user already
    (docker --user), or without PUID, nothing changes. Returns what was done, for the log.

    Ours means the config file, the database with its -wal and -shm, the backups we made beside
    them, and a folder we create for them. A folder that was there is given only if it holds
    nothing else (Docker makes a missing host folder as root, empty): never a shared one, and
    nothing inside one is looked at beyond its own entries (a share mounted at /data keeps its
    owners; the database's folder must then be writable by PUID, which the start says)."""
    if not env.get("PUID", "").strip() or not hasattr(os, "getuid") or os.getuid() != 0:
        return None
    try:
        uid = int(env["PUID"])
        gid = int(env.get("PGID", "").strip() or uid)
        umask = int(env["UMASK"], 8) if env.get("UMASK", "").strip() else None
    except ValueError:
        raise ConfigError("PUID and PGID must be numbers, UMASK an octal number like 022") from None
    if umask is not None:
        os.umask(umask)
    config_file = Path(path).absolute()
    databases = {Path(_default_database_path(path)).absolute()}
    with suppress(
        ConfigError
    ):  # no usable config yet: setup mode writes one, with the default path
        databases = {Path(load_config(path).database_path).absolute()}
    ours = {config_file, *(Path(f"{db}{end}") for db in databases for end in ("", "-wal", "-shm"))}
    for db in databases:  # Older program: its file, kept beside ours when we moved it over
        ours |= set(db.parent.glob(f"{glob.escape(db.name)}.older-*.bak"))
    ours |= set(config_file.parent.glob(f"{glob.escape(config_file.name)}.*.bak"))  # setup's saves
    given: list[Path] = []
    for folder in sorted({config_file.parent, *(db.parent for db in databases)}):
        made = [p for p in (folder, *folder.parents) if not p.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        if made or all(entry in ours for entry in folder.iterdir()):
            given += made or [folder]
    given += sorted(p for p in ours if p.exists())
    changed = []
    for entry in given:
        st = entry.lstat()
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.lchown(entry, uid, gid)
            changed.append(str(entry))
    # Everything the service imports later, imported while its files can still be read.
    import waitress  # noqa: F401
    import yaml  # noqa: F401

    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    given_to = ", ".join(changed) or "nothing (all was its already)"
    return f"running as {uid}:{gid} (PUID/PGID); given to it: {given_to}"


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    path = find_config_path(args.config)
    try:
        dropped = drop_privileges(path, dict(os.environ))
    except (ConfigError, OSError) as e:
        print(f"jellyfin-db-sync: cannot take PUID/PGID: {e}", file=sys.stderr)
        return 2
    if dropped:
        print(f"jellyfin-db-sync: {dropped}", file=sys.stderr)
    if args.healthcheck:
        return healthcheck(path)
    one_off = (
        args.check_config
        or args.backup
        or args.reconcile
        or args.dry_run
        or args.setup_webhooks is not None
        or args.undo
        or args.export
        or args.import_file
    )
    if not os.path.exists(path) and not _servers_in_env(os.environ):
        if one_off:  # a check never writes anything
            print(
                f"jellyfin-db-sync: no configuration at {path} (and no JDS_SERVER_* variables)",
                file=sys.stderr,
            )
            return 2
        return setup_mode(path, f"no configuration at {path}")
    try:
        config = load_config(path)
    except ConfigError as e:
        print(f"jellyfin-db-sync: configuration error: {e}", file=sys.stderr)
        # The service stays up and says so on its page: exiting would become a restart loop.
        return 2 if one_off else setup_mode(path, f"configuration error: {e}")
    if args.check_config:
        return check_config(config)
    if args.setup_webhooks is not None:
        return setup_webhooks_cli(config, args.setup_webhooks or config.public_url)
    configure_logging(config.log_level)
    if args.backup:
        return backup_cli(config, args.backup)
    if args.undo or args.export or args.import_file:
        return safety_cli(config, args)
    if args.reconcile or args.dry_run:
        return reconcile_cli(config, args.dry_run)
    return serve(config, path)


class ServiceSwitch:
    """The WSGI app Waitress serves: each request goes to the app of the moment — the setup
    page, then the service; after a save on the dashboard's /setup, a service built from the
    saved file. The new service starts before the old one stops, so a webhook arriving during
    the change always finds one to take it; one change at a time."""

    def __init__(self, path: str):
        self.path = path
        self.app: Any = None  # the setup page, or the service's app (run)
        self.service: Service | None = None
        self._lock = threading.Lock()  # guards service and app while one is replaced

    def __call__(self, environ: dict, start_response: Any) -> Any:
        return self.app(environ, start_response)

    def run(self, config: Config) -> Service:
        """Start a service for ``config`` and put it in place of the running one (if any)."""
        with self._lock:
            service = Service(config, self.path, self.run)
            service.start_workers()
            old, self.service, self.app = self.service, service, service.app
        if old is not None:
            old.stop()
            log.info("settings applied: the service now runs with %s", config.source)
        return service

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()


def _listen_on(path: str) -> tuple[int, str]:
    """(port, host) for a file that cannot be loaded as a whole: JDS_PORT/JDS_HOST, else its
    server.port/server.host if those can be read, else the defaults — so one mistake elsewhere
    in the file does not move the setup page away from the port the person chose."""
    server: Any = {}
    with suppress(Exception):  # unreadable, not YAML, no mapping: the defaults
        import yaml

        server = (yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}).get("server") or {}
    if not isinstance(server, dict):
        server = {}
    port = os.environ.get("JDS_PORT", "").strip() or server.get("port")
    host = os.environ.get("JDS_HOST", "").strip() or server.get("host")
    with suppress(TypeError, ValueError):
        if 0 < int(port) < 65536:
            return int(port), str(host or SETTING["server.host"].default)
    return SETTING["server.port"].default, str(host or SETTING["server.host"].default)


def setup_mode(path: str, problem: str) -> int:
    """No usable configuration: serve the setup page (see Setup) until one is saved, then the
    service itself, in the same process — never an exit that Docker would turn into a loop."""
    configure_logging("INFO")
    switch = ServiceSwitch(path)
    setup = Setup(path, switch.run, problem)
    switch.app = setup
    port, host = _listen_on(path)
    try:
        server = make_waitress(switch, host, port)
    except ListenError as e:
        log.error("%s", e)
        return 2
    log.warning("%s", problem)
    log.warning(
        "setup mode: open http://%s:%s/ in a browser to set up jellyfin-db-sync; the setup code is "
        "%s",
        _reachable_host(host),
        server.effective_port,
        setup.code,
    )
    _stop_on_signals()
    return _run_until_stopped(server, switch.stop)


def _run_until_stopped(server: Any, stop: Any) -> int:
    """Serve until SIGTERM or SIGINT, then close the server and stop what ``stop`` stops."""
    try:
        server.run()
    except SystemExit:
        pass
    finally:
        server.close()
        stop()
        log.info("stopped")
    return 0


def _stop_on_signals() -> None:
    def on_signal(signum: int, _frame: Any) -> None:
        # Waitress installs no handlers; as PID 1 in Docker an unhandled SIGTERM is ignored.
        log.info("%s received: stopping", signal.Signals(signum).name)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def healthcheck(path: str) -> int:
    """Docker's HEALTHCHECK: the port comes from the same place the service took it (the file,
    JDS_PORT over it), so a port set in the file does not make the container "unhealthy"."""
    try:
        port = load_config(path).port
    except ConfigError:
        port = _listen_on(path)[0]
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=4)
        conn.request("GET", "/healthz")
        return 0 if conn.getresponse().status == 200 else 1
    except OSError:
        return 1


def setup_webhooks_cli(config: Config, base_url: str) -> int:
    """--setup-webhooks [URL]: our destination in every server's Webhook plugin."""
    if not base_url.startswith(("http://", "https://")):
        print(
            "jellyfin-db-sync: give the address Jellyfin reaches this service at, e.g. "
            "--setup-webhooks http://192.168.1.5:8080 (or set server.public_url)",
            file=sys.stderr,
        )
        return 2
    setup = PluginSetup(config, {s.name: JellyfinClient(s) for s in config.servers})
    results = [setup.run(s.name, base_url) for s in config.servers]
    for result, message in results:
        print(("✗ " if result == "error" else "✓ ") + message)
    return 1 if any(r == "error" for r, _ in results) else 0


def backup_cli(config: Config, dest: str) -> int:
    """--backup FILE: an online copy of the database."""
    try:
        size = Store(config.database_path, config.journal_mode).backup(dest)
    except (StoreError, OSError) as e:
        print(f"jellyfin-db-sync: backup failed: {e}", file=sys.stderr)
        return 1
    print(f"backup of {config.database_path} written to {dest} ({size:,} bytes)")
    return 0


def _reachable_host(host: str) -> str:
    """The name to put in a webhook URL: this machine's name when listening on every address."""
    if host in ("", "0.0.0.0", "::"):
        return socket.gethostname() or "localhost"
    return host


def serve(config: Config, path: str) -> int:
    """The service: threads, then Waitress until SIGTERM or SIGINT. Behind a ServiceSwitch, so
    settings saved on the dashboard's /setup (the file at ``path``) apply without a restart."""
    cpu = keep_to_one_cpu(config.cpu)
    if cpu is not None:
        log.info("running on CPU %d (server.cpu: %s)", cpu, config.cpu)
    switch = ServiceSwitch(path)
    service = open_service(config, path, switch.run)
    if service is None:
        return 1
    switch.service, switch.app = service, service.app
    try:
        server = service.server = make_waitress(switch, config.host, config.port)
    except ListenError as e:
        log.error("%s", e)
        service.stop()
        return 2
    for warning in config.warnings:
        log.warning("configuration: %s", warning)
    open_hooks = config.open_webhooks()
    if open_hooks:
        log.warning(
            "no webhook token for %s: anyone who can reach port %d can post webhooks as that "
            "server",
            ", ".join(open_hooks),
            config.port,
        )
    if not config.auth_username:
        log.warning("%s", read_only_reason(config))

    if config.sync.dry_run:
        log.warning(
            "dry run (sync.dry_run / JDS_DRY_RUN): changes are decided and logged, nothing is "
            "written to Jellyfin"
        )
    _stop_on_signals()
    service.start_workers()
    base = config.public_url or f"http://{_reachable_host(config.host)}:{server.effective_port}"
    hooks = ", ".join(f"{base}/webhook/{s.name}" for s in config.servers) or "no servers configured"
    log.info(
        "jellyfin-db-sync %s listening on %s:%s; webhook URLs: %s",
        __version__,
        config.host,
        server.effective_port,
        hooks,
    )
    return _run_until_stopped(server, switch.stop)


if __name__ == "__main__":
    sys.exit(main())
