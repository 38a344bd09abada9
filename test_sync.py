"""Tests for jellyfin-db-sync, run against in-process fake Jellyfin servers over real HTTP.

    pytest -q test_sync.py            # the suite
    python benchmark.py               # the figures in the README (a command of its own)

The fake servers behave like Jellyfin where the service depends on it (docs/jellyfin.md):
per-version routes (10.8 legacy, 10.9+ ?userId=), MediaBrowser auth (12.0 refuses X-Emby-Token),
user-data semantics (mark played resets the position, PlaybackStart forces Played=false on a
re-watch, /UserData copies fields verbatim) and an echo webhook for every save, fired back at the
service exactly as the Webhook plugin would.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import jellyfin_db_sync as jds

HERE = Path(__file__).resolve().parent
# The Webhook plugin's request bodies, byte-exact (fixtures/webhooks/README.md says how they were
# made).
FIXTURES = HERE / "fixtures" / "webhooks"


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def eventually(check, timeout: float = 10.0, interval: float = 0.02, what: str = ""):
    """Poll ``check`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what or check}: last value {last!r}")


def iso(epoch: float | None = None) -> str:
    """A date as Jellyfin writes it: UTC, 7 fractional digits, Z. (The fake servers use their
    own date code, never the service's: a bug there must not be mirrored by the fakes.)"""
    moment = datetime.fromtimestamp(time.time() if epoch is None else epoch, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"


def parse_iso(text: str) -> float:
    """Jellyfin's ISO dates (as the server's own DateTime parsing reads its query strings)."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z", text)
    whole = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()
    return whole + float("0" + (m.group(2) or ""))


def hexid() -> str:
    return uuid.uuid4().hex


# ── Fake Jellyfin ────────────────────────────────────────────────────────────

BLANK_USER_DATA = {
    "PlaybackPositionTicks": 0,
    "PlayCount": 0,
    "IsFavorite": False,
    "Rating": None,
    "LastPlayedDate": None,
    "Played": False,
}  # an item the user never touched
# The only item types the Webhook plugin sends events for (its item-type checkboxes;
# reference/webhook-plugin.md §0.6): nothing for BoxSet, MusicArtist, Playlist, MusicVideo…
PLUGIN_ITEM_TYPES = ("Movie", "Episode", "Season", "Series", "MusicAlbum", "Audio", "Video")
# …each only to a destination with its checkbox ticked (the plugin's GenericOption).
PLUGIN_ITEM_BOXES = {
    "Movie": "EnableMovies",
    "Episode": "EnableEpisodes",
    "Season": "EnableSeasons",
    "Series": "EnableSeries",
    "MusicAlbum": "EnableAlbums",
    "Audio": "EnableSongs",
    "Video": "EnableVideos",
}
WRITE_ROUTES = re.compile(r"(PlayedItems|FavoriteItems|/Rating|/UserData)", re.I)


class FakeJellyfin:
    """One Jellyfin server, in-process, with real HTTP, auth, routes per version and echoes."""

    def __init__(self, name: str, version: str = "10.10.7"):
        self.name = name
        self.version = version
        self.api_key = hexid()
        self.server_id = hexid()
        self.users: dict[str, dict] = {}
        self.items: dict[str, dict] = {}
        self.data: dict[tuple[str, str], dict] = {}
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str]] = []  # (method, path) of authenticated API calls
        self.passwords: dict[str, str] = {}  # what /Users/New was given, to check it was set
        self.playlists: dict[str, dict] = {}
        self.status_override: int | None = None  # e.g. 503: the server is "down"
        self.writes_fail = False  # reads answer, writes get 503 (a server busy scanning, say)
        self.writes_fail_items: set[str] = set()  # as writes_fail, for writes to these items only
        self.writes_refused = 0
        self.delay = 0.0  # seconds added to every authenticated API call
        self.webhook_url: str | None = None
        self.echo_threads: list[threading.Thread] = []
        self.webhooks_sent = 0
        self.bytes_sent = 0  # response bodies (for the benchmarks' "MB read")
        # Writes being answered at once, and the most seen (reads — a pass's lists, a health
        # check — may overlap them from other threads: only the writers' connections are counted).
        self.in_flight = self.max_in_flight = 0
        self.closed = False
        # The Webhook plugin: installed, with someone's own destination already in it.
        self.plugin_installed = True
        self.plugin_config: dict = {
            "ServerUrl": "",
            "GenericOptions": [
                {
                    "WebhookName": "home-assistant",
                    "WebhookUri": "http://ha.local/hook",
                    "Headers": [],
                }
            ],
            "DiscordOptions": [],
        }
        self.plugin_saves = 0
        self.date_played_reads = 0  # user item lists sorted by DatePlayed (the recent check)
        self.configuration_writes = 0  # POSTs of a user's Configuration
        self._keys_by_user: tuple[int, dict[str, list[str]]] = (0, {})  # see _user_data
        self._position: dict[str, int] = {}  # see _positions
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # keep pytest output readable
                pass

            def setup(self):
                super().setup()
                # Jellyfin (Kestrel) answers in one segment; without this, headers and body go
                # out separately and Nagle + delayed ACK add 40 ms to every call.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _handle(self):
                if fake.away:  # a connection kept alive from before: the machine is gone
                    self.close_connection = True
                    return
                fake._dispatch(self)

            do_GET = do_POST = do_DELETE = _handle

        self.away = False  # go_away(): nothing listens on its port
        self._handler = Handler
        self._listen(0)

    def _listen(self, port: int) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(
            target=self.httpd.serve_forever, daemon=True, name=f"fake-{self.name}"
        ).start()

    def go_away(self) -> None:
        """The machine is off: connections are refused (not answered with an error status)."""
        self.away = True
        self.httpd.shutdown()
        self.httpd.server_close()

    def come_back(self) -> None:
        self._listen(self.httpd.server_address[1])
        self.away = False

    @property
    def legacy(self) -> bool:
        return self.version.startswith("10.8")

    def close(self):
        if self.closed:
            return
        self.closed = True
        if not self.away:
            self.httpd.shutdown()
            self.httpd.server_close()

    # data set-up
    def add_user(self, name: str, admin: bool = False) -> str:
        uid = hexid()
        self.users[uid] = {
            "Name": name,
            "Id": uid,
            "Policy": {"IsAdministrator": admin},
            "Configuration": self._user_configuration({}),
        }
        return uid

    def _user_configuration(self, sent: dict) -> dict:
        """A UserConfiguration as UserManager.UpdateConfigurationAsync stores it and GetUserDto
        returns it: every field not sent falls back to the DTO's default (the UserConfiguration
        constructor), so a write replaces the whole object. A null AudioLanguagePreference is
        left out of the answer (JsonDefaults: WhenWritingNull); SubtitleLanguagePreference comes
        back "" (GetUserDto: ``?? string.Empty``). The four library-id lists hold this server's
        own ids: a person's home screen order and exclusions, meaningless on another server."""
        views = [hexid(), hexid()]  # what a new user gets here: this server's libraries
        out = {
            "PlayDefaultAudioTrack": sent.get("PlayDefaultAudioTrack", True),
            "SubtitleLanguagePreference": sent.get("SubtitleLanguagePreference") or "",
            "DisplayMissingEpisodes": sent.get("DisplayMissingEpisodes", False),
            "GroupedFolders": sent.get("GroupedFolders", []),
            "SubtitleMode": sent.get("SubtitleMode", "Default"),
            "DisplayCollectionsView": sent.get("DisplayCollectionsView", False),
            "EnableLocalPassword": sent.get("EnableLocalPassword", False),
            "OrderedViews": sent.get("OrderedViews", views if not sent else []),
            "LatestItemsExcludes": sent.get("LatestItemsExcludes", []),
            "MyMediaExcludes": sent.get("MyMediaExcludes", views[1:] if not sent else []),
            "HidePlayedInLatest": sent.get("HidePlayedInLatest", True),
            "RememberAudioSelections": sent.get("RememberAudioSelections", True),
            "RememberSubtitleSelections": sent.get("RememberSubtitleSelections", True),
            "EnableNextEpisodeAutoPlay": sent.get("EnableNextEpisodeAutoPlay", True),
        }
        if sent.get("AudioLanguagePreference") is not None:
            out["AudioLanguagePreference"] = sent["AudioLanguagePreference"]
        return out

    def user_sets(self, user: str, **settings) -> None:
        """A person changes their own settings in a client (Settings → Playback / Subtitles):
        the client sends its whole Configuration back with these changed. No webhook fires."""
        with self.lock:
            uid = self.user(user)
            self.users[uid]["Configuration"] = self._user_configuration(
                {**self.users[uid]["Configuration"], **settings}
            )

    def configuration(self, user: str) -> dict:
        return copy.deepcopy(self.users[self.user(user)]["Configuration"])

    def add_item(
        self,
        name: str,
        type_: str = "Movie",
        path: str | None = None,
        runtime: int = 7200 * 10**7,
        provider_ids: dict | None = None,
        series_id: str | None = None,
        season: int | None = None,
        episode: int | None = None,
        saved: float | None = None,
        year: int | None = None,
    ) -> str:
        iid = hexid()
        self.items[iid] = {
            "Name": name,
            "Id": iid,
            "Type": type_,
            "Path": path,
            "RunTimeTicks": runtime,
            "ProviderIds": provider_ids or {},
            "SeriesId": series_id,
            "ParentIndexNumber": season,
            "IndexNumber": episode,
            "ProductionYear": year,
            "_saved": time.time() if saved is None else saved,
        }
        return iid

    def add_library(self, count: int) -> None:
        """``count`` films, "Film 0" … , scanned yesterday (so not "new" to an incremental
        refresh)."""
        for i in range(count):
            self.add_item(
                f"Film {i}",
                "Movie",
                f"/media/movies/Film {i}/film.mkv",
                provider_ids={"Tmdb": str(i)},
                saved=time.time() - 86400,
            )

    def user(self, name: str) -> str:
        return next(u for u, d in self.users.items() if d["Name"].casefold() == name.casefold())

    # playlists (no webhook fires for them, as in Jellyfin)
    def add_playlist(
        self,
        user: str,
        name: str,
        items: list[str],
        public: bool = False,
        shared_with: tuple[str, ...] = (),
    ) -> str:
        pid = hexid()
        self.playlists[pid] = {
            "Name": name,
            "Id": pid,
            "owner": self.user(user),
            "OpenAccess": public,
            "shares": [self.user(u) for u in shared_with],
            "entries": [(hexid(), self.item(i)) for i in items],
            "_saved": time.time(),
            "_path": self._playlist_path(name),
        }
        return pid

    def _playlist_path(self, name: str) -> str:
        """Where Jellyfin keeps a new playlist: <data>/playlists/<name>, "1" added while that is
        taken (PlaylistManager.CreatePlaylist and GetTargetPath, v10.11.8): whoever came first."""
        path = f"/config/data/playlists/{name}"
        while any(p.get("_path") == path for p in self.playlists.values()):
            path += "1"
        return path

    def _row(self, iid: str) -> dict:
        """An item as /Items lists it: one of the library's, or a playlist — an item of its own
        (Playlist.cs) that a person can heart, kept in the server's data folder
        (PlaylistManager.CreatePlaylist: <data>/playlists/<name>). KeyError: neither (→ 404)."""
        if iid in self.items:
            return self.items[iid]
        p = self.playlists[iid]
        path = p.get("_path") or f"/config/data/playlists/{p['Name']}"
        return {
            "Name": p["Name"],
            "Id": iid,
            "Type": "Playlist",
            "Path": path,
            "_saved": p.get("_saved", 0.0),
        }

    def playlist(self, user: str, name: str) -> list[str] | None:
        """Item names of the user's playlist called ``name``, in order (None: no such playlist)."""
        uid = self.user(user)
        for p in self.playlists.values():
            if p["owner"] == uid and p["Name"].casefold() == name.casefold():
                return [self.items[i]["Name"] for _, i in p["entries"]]
        return None

    def _admin(self, uid: str) -> bool:
        return bool(self.users[uid]["Policy"].get("IsAdministrator"))

    def _sees(self, uid: str, p: dict) -> bool:
        """Playlist.IsVisible (10.9+): open to all, its owner, or shared with them."""
        return p["OpenAccess"] or p["owner"] == uid or uid in p["shares"]

    def _can_delete(self, uid: str, p: dict, single: bool) -> bool:
        """Playlist.CanDelete: administrator or owner (10.9 → 12.0). On 12.0 list answers go
        through BaseItem.CanDelete(user, allCollectionFolders) instead (DtoService.cs), which
        says yes to everyone who sees it; a single GET /Items/{id} still applies the rule."""
        if self.version.startswith("12.") and not single:
            return True
        return self._admin(uid) or p["owner"] == uid

    def _playlist_dto(self, uid: str | None, p: dict, fields: set, single: bool = False) -> dict:
        dto = {"Name": p["Name"], "Id": p["Id"], "Type": "Playlist"}
        if uid and "CanDelete" in fields and not self.legacy:
            dto["CanDelete"] = self._can_delete(uid, p, single)
        return dto

    def _playlists_of(self, uid: str | None, q: dict) -> dict:
        seen = [p for p in self.playlists.values() if uid is None or self._sees(uid, p)]
        fields = set((q.get("fields") or "").split(","))
        return {
            "Items": [self._playlist_dto(uid, p, fields) for p in seen],
            "TotalRecordCount": len(seen),
        }

    def _playlist_route(self, method: str, seg: list[str], q: dict, body):
        if seg == ["Playlists"] and method == "POST":
            pid = hexid()
            public = body.get("IsPublic", not self.legacy)  # 10.9+ defaults to public
            self.playlists[pid] = {
                "Name": body["Name"],
                "Id": pid,
                "owner": body["UserId"],
                "OpenAccess": public,
                "shares": [],
                "entries": [(hexid(), i) for i in body.get("Ids") or []],
                "_saved": time.time(),
                "_path": self._playlist_path(body["Name"]),
            }
            return 200, {"Id": pid}
        p = self.playlists[seg[1]]
        if len(seg) in (2, 3, 4) and method == "GET" and (len(seg) == 2 or seg[2] == "Users"):
            if self.version.startswith(("10.8", "10.9")):
                return 404, None  # no PlaylistDto before 10.10
            # PlaylistsController.GetPlaylist / GetPlaylistUsers use the caller's user id, empty
            # for an API key: UserManager.GetUserById(Guid.Empty) throws ArgumentException, which
            # the exception middleware answers with 400 (jellyfin/jellyfin#13476, #15600).
            return 400, None
        if len(seg) == 3 and seg[2] == "Items" and method == "GET":
            out = []
            for entry, iid in p["entries"]:
                d = {
                    k: v
                    for k, v in self.items[iid].items()
                    if not k.startswith("_") and v is not None
                }
                out.append({**d, "PlaylistItemId": entry})
            return 200, {"Items": out, "TotalRecordCount": len(out)}
        if len(seg) == 3 and seg[2] == "Items" and method == "POST":
            p["entries"] += [(hexid(), i) for i in q["ids"].split(",")]
            return 204, None
        if len(seg) == 3 and seg[2] == "Items" and method == "DELETE":
            if self.version.startswith(("10.8", "10.9", "10.10")):
                return 403, None  # an API key may remove entries only from 10.11 on
            gone = set(q["entryids"].split(","))
            p["entries"] = [(e, i) for e, i in p["entries"] if e not in gone]
            return 204, None
        return 404, None

    # accounts, as an administrator manages them (each fires its webhook)
    def _create_user(self, body: dict):
        name = body.get("Name") or ""
        if not re.fullmatch(r"[\w\ \-'._@+]+", name) or any(
            d["Name"].casefold() == name.casefold() for d in self.users.values()
        ):
            return 400, None  # duplicate or invalid: Jellyfin cannot tell which
        uid = self.add_user(name)
        self.passwords[uid] = body.get("Password") or ""
        self.fire_user("UserCreated", uid)
        if body.get("Password"):
            self.fire_user("UserPasswordChanged", uid)
        return 200, self.users[uid]

    def delete_user(self, uid: str) -> None:
        self.fire_user("UserDeleted", uid)
        del self.users[uid]

    def _update_configuration(self, uid: str, body: dict):
        """UserManager.UpdateConfigurationAsync: the whole object is replaced by what was sent
        (no webhook fires: the plugin has no notification for it)."""
        if uid not in self.users:
            return 404, None  # v10.11.8: GetUserById → null → NotFound
        with self.lock:
            self.users[uid]["Configuration"] = self._user_configuration(body or {})
            self.configuration_writes += 1
        return 204, None

    def _rename_user(self, uid: str, name: str):
        self.users[uid]["Name"] = name
        self.fire_user("UserUpdated", uid)
        return 204, None

    def admin_creates_user(self, name: str, password: str = "pw"):
        return self._create_user({"Name": name, "Password": password})[1]["Id"]

    def admin_renames_user(self, old: str, new: str) -> None:
        self._rename_user(self.user(old), new)

    def fire_user(self, ntype: str, uid: str) -> None:
        if not self.webhook_url:
            return
        body = fixture("UserCreated.json")
        body.update(
            ServerId=self.server_id,
            ServerName=self.name,
            ServerVersion=self.version,
            NotificationType=ntype,
            NotificationUsername=self.users[uid]["Name"],
            UserId=uid,
        )
        self._send_later(json.dumps(body).encode())

    def item(self, name: str) -> str:
        return next(i for i, d in self.items.items() if d["Name"] == name)

    def ud(self, user: str, item: str) -> dict:
        """The raw user data row (creating the default one, as Jellyfin does)."""
        known = item in self.items or item in self.playlists
        key = (user if user in self.users else self.user(user), item if known else self.item(item))
        with self.lock:
            return self.data.setdefault(key, dict(BLANK_USER_DATA))

    def writes(self) -> int:
        return sum(
            1 for m, p in self.requests if m in ("POST", "DELETE") and WRITE_ROUTES.search(p)
        )

    # the server's own behaviour (docs/jellyfin.md §2, semantics)
    def _dto(self, ud: dict, item_id: str) -> dict:
        out = {
            "PlaybackPositionTicks": ud["PlaybackPositionTicks"],
            "PlayCount": ud["PlayCount"],
            "IsFavorite": ud["IsFavorite"],
            "Played": ud["Played"],
            "Key": item_id,
        }
        if ud["Rating"] is not None:
            out["Rating"] = ud["Rating"]
            out["Likes"] = ud["Rating"] >= 6.5
        if ud["LastPlayedDate"]:
            out["LastPlayedDate"] = ud["LastPlayedDate"]
        if not self.legacy and not self.version.startswith(("10.9", "10.10")):
            out["ItemId"] = item_id
        return out

    def save(self, uid: str, iid: str, reason: str, **changes) -> dict:
        """UserDataManager.SaveUserData: apply, then fire UserDataSaved — always, changed or not."""
        with self.lock:
            ud = self.ud(uid, iid)
            ud.update(changes)
            snapshot = dict(ud)
        self.fire("UserDataSaved", uid, iid, snapshot, SaveReason=reason)
        return self._dto(snapshot, iid)

    def mark_played(self, uid, iid, date_played: str | None = None, reason="TogglePlayed"):
        ud = self.ud(uid, iid)
        count = ud["PlayCount"] + 1 if date_played else max(ud["PlayCount"], 1)
        if self.legacy:
            last = date_played or iso()
        else:
            last = date_played or ud["LastPlayedDate"] or iso()
        return self.save(
            uid,
            iid,
            reason,
            Played=True,
            PlaybackPositionTicks=0,
            PlayCount=count,
            LastPlayedDate=last,
        )

    def mark_unplayed(self, uid, iid):
        return self.save(
            uid,
            iid,
            "TogglePlayed",
            Played=False,
            PlaybackPositionTicks=0,
            PlayCount=0,
            LastPlayedDate=None,
        )

    # what a person does in a Jellyfin client
    def user_marks(self, user: str, item: str, played: bool):
        uid, iid = self.user(user), self.item(item)
        return self.mark_played(uid, iid) if played else self.mark_unplayed(uid, iid)

    def user_favourites(self, user: str, item: str, on: bool):
        return self.save(self.user(user), self.item(item), "UpdateUserRating", IsFavorite=on)

    def user_rates(self, user: str, item: str, likes: bool | None):
        rating = None if likes is None else (10.0 if likes else 1.0)
        return self.save(self.user(user), self.item(item), "UpdateUserRating", Rating=rating)

    def user_plays(self, user: str, item: str, positions: list[int], completed: bool = False):
        """Start, report progress, stop: the events a player causes, in order."""
        uid, iid = self.user(user), self.item(item)
        ud = self.ud(uid, iid)
        # PlaybackStart: PlayCount+1, LastPlayedDate=now, Played forced false for a resumable video.
        self.fire(
            "PlaybackStart",
            uid,
            iid,
            dict(ud),
            PlaybackPositionTicks=positions[0] if positions else 0,
        )
        self.save(
            uid,
            iid,
            "PlaybackStart",
            PlayCount=ud["PlayCount"] + 1,
            LastPlayedDate=iso(),
            Played=False,
        )
        for pos in positions:
            self.fire(
                "PlaybackProgress",
                uid,
                iid,
                dict(ud),
                PlaybackPositionTicks=pos,
                IsPaused=False,
                IsAutomated=False,
            )
            self.save(uid, iid, "PlaybackProgress", PlaybackPositionTicks=pos)
        last = positions[-1] if positions else 0
        if completed:
            self.save(uid, iid, "PlaybackFinished", Played=True, PlaybackPositionTicks=0)
        else:
            self.save(uid, iid, "PlaybackFinished", PlaybackPositionTicks=last)
        self.fire(
            "PlaybackStop",
            uid,
            iid,
            dict(self.ud(uid, iid)),
            PlaybackPositionTicks=last,
            PlayedToCompletion=completed,
        )

    # webhooks, as the plugin builds them ("Send All Properties")
    def payload(self, ntype: str, uid: str, iid: str, ud: dict, **extra) -> dict:
        item = self.items[iid]
        base = fixture(
            {
                "UserDataSaved": "UserDataSaved-played.json",
                "PlaybackStart": "PlaybackStart-movie.json",
                "PlaybackProgress": "PlaybackProgress-movie.json",
                "PlaybackStop": "PlaybackStop-movie.json",
            }[ntype]
        )
        for k in (
            "SeriesName",
            "SeriesId",
            "SeasonId",
            "SeasonNumber",
            "EpisodeNumber",
            "Provider_tvdb",
            "Provider_imdb",
            "Provider_tmdb",
            "Year",
            "LastPlayedDate",
        ):
            base.pop(k, None)
        now = time.time()
        base.update(
            {
                "ServerId": self.server_id,
                "ServerName": self.name,
                "ServerVersion": self.version,
                "ServerUrl": self.url,
                "Timestamp": iso(now).replace("Z", "+00:00"),
                "UtcTimestamp": iso(now),
                "Name": item["Name"],
                "ItemId": iid,
                "ItemType": item["Type"],
                "RunTimeTicks": item["RunTimeTicks"],
                "UserId": uid,
                "NotificationUsername": self.users[uid]["Name"],
            }
        )
        for k, v in (item["ProviderIds"] or {}).items():
            base[f"Provider_{k.lower()}"] = v
        if item["Type"] == "Episode":
            base.update(
                SeriesName="Show",
                SeasonNumber=item["ParentIndexNumber"],
                EpisodeNumber=item["IndexNumber"],
            )
            if not self.legacy:
                base["SeriesId"] = item["SeriesId"]
        if item["Type"] == "Season":  # its show and number (reference/webhook-plugin.md §1, Season)
            base.update(
                SeriesName=self.items[item["SeriesId"]]["Name"], SeasonNumber=item["IndexNumber"]
            )
            if not self.legacy:
                base["SeriesId"] = item["SeriesId"]
        if ntype == "UserDataSaved":
            rating = ud["Rating"]
            base.update(
                {
                    "Likes": bool(rating is not None and rating >= 6.5),
                    "Rating": rating or 0,
                    "PlaybackPositionTicks": ud["PlaybackPositionTicks"],
                    "PlayCount": ud["PlayCount"],
                    "Favorite": ud["IsFavorite"],
                    "Played": ud["Played"],
                }
            )
            if ud["LastPlayedDate"]:
                base["LastPlayedDate"] = ud["LastPlayedDate"]
        base.update(extra)
        return base

    def played_payload(self, uid: str, iid: str, **extra) -> dict:
        """The UserDataSaved body of "mark played" (TogglePlayed), without changing anything."""
        ud = dict(self.ud(uid, iid), Played=True, PlayCount=1)
        return self.payload("UserDataSaved", uid, iid, ud, SaveReason="TogglePlayed", **extra)

    def fire(self, ntype: str, uid: str, iid: str, ud: dict, **extra) -> None:
        """Fire-and-forget, concurrently, like the plugin: no retry, order not guaranteed. To
        webhook_url (set by a test, as a person would by hand), and to every enabled Generic
        destination with Send All Properties that takes this type (as set up by the service)."""
        kind = self._row(iid)["Type"]
        if kind not in PLUGIN_ITEM_TYPES:
            return  # the plugin drops events of other item types silently
        body = json.dumps(self.payload(ntype, uid, iid, ud, **extra)).encode()
        if self.webhook_url:
            self._send_later(body)
        for d in self.plugin_config.get("GenericOptions") or []:
            takes = (
                d.get("EnableWebhook")
                and d.get("SendAllProperties")
                and d.get(PLUGIN_ITEM_BOXES[kind])
            )
            if takes and ntype in (d.get("NotificationTypes") or []):
                headers = {h["Key"]: h["Value"] for h in d.get("Headers") or []}
                self._send_later(body, d["WebhookUri"], headers)

    def _send_later(self, body: bytes, url: str | None = None, headers: dict | None = None) -> None:
        t = threading.Thread(target=self._send, args=(body, url, headers), daemon=True)
        self.echo_threads.append(t)
        t.start()

    def _send(self, body: bytes, url: str | None = None, headers: dict | None = None) -> None:
        parts = urllib.parse.urlsplit(url or self.webhook_url)
        try:
            conn = HTTPConnection(parts.hostname, parts.port, timeout=10)
            conn.request(
                "POST",
                parts.path,
                body,
                {"Content-Type": "text/plain; charset=utf-8", **(headers or {})},
            )
            conn.getresponse().read()
            conn.close()
            self.webhooks_sent += 1
        except OSError:
            pass  # the plugin logs and drops it

    def quiet(self) -> bool:
        return all(not t.is_alive() for t in list(self.echo_threads))

    # HTTP
    def _authorised(self, h: BaseHTTPRequestHandler, query: dict) -> bool:
        auth = h.headers.get("Authorization", "")
        m = re.match(r"^MediaBrowser\s+(.*)$", auth, re.I)
        if m:
            params = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            if params.get("Token") == self.api_key:  # keys are case-sensitive
                return True
        if query.get("ApiKey") == self.api_key:
            return True
        legacy_ok = not self.version.startswith("12.")  # 12.0 disables legacy auth by default
        return legacy_ok and (
            h.headers.get("X-Emby-Token") == self.api_key or query.get("api_key") == self.api_key
        )

    def _dispatch(self, h: BaseHTTPRequestHandler) -> None:
        parts = urllib.parse.urlsplit(h.path)
        query = {
            k.lower() if k.lower() != "apikey" else "ApiKey": v
            for k, v in urllib.parse.parse_qsl(parts.query)
        }
        length = int(h.headers.get("Content-Length") or 0)
        body = json.loads(h.rfile.read(length)) if length else None
        path = parts.path
        if path == "/System/Info/Public" and h.command == "GET":
            if self.status_override:
                return self._reply(h, self.status_override, None)
            return self._reply(
                h,
                200,
                {
                    "Id": self.server_id,
                    "ServerName": self.name,
                    "Version": self.version,
                    "ProductName": "Jellyfin Server",
                },
            )
        if self.status_override:
            return self._reply(h, self.status_override, None)
        if h.command != "GET" and (
            self.writes_fail or any(i in path for i in self.writes_fail_items)
        ):
            self.writes_refused += 1
            return self._reply(h, 503, None)
        if not self._authorised(h, query):
            return self._reply(h, 401, None)
        writing = h.command == "POST" and bool(WRITE_ROUTES.search(path))
        with self.lock:
            self.requests.append((h.command, path))
            self.in_flight += writing
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                time.sleep(self.delay)  # a slow server (a NAS under load, a remote one)
            status, out = self._route(h.command, path, query, body)
        except KeyError:
            status, out = (500, None) if self.legacy else (404, None)
        finally:
            with self.lock:
                self.in_flight -= writing
        self._reply(h, status, out)

    def _reply(self, h, status: int, out) -> None:
        data = b"" if out is None else json.dumps(out).encode()
        self.bytes_sent += len(data)
        if status >= 400 and not data:
            data = b'"Error processing request."'
        h.send_response(status)
        h.send_header("Content-Type", "application/json; charset=utf-8")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _route(self, method: str, path: str, q: dict, body):
        """The first entry of ROUTES whose method (None: any) and pattern match the path, and whose
        handler answers (None: not this one after all, on to the next); else 404."""
        seg = [s for s in path.split("/") if s]
        joined = "/".join(seg)
        for verb, pattern, handler in self.ROUTES:
            if (verb is None or verb == method) and pattern.fullmatch(joined):
                answer = handler(self, method, seg, q, body)
                if answer is not None:
                    return answer
        return 404, None

    def _on_users_list(self, method, seg, q, body):
        return 200, list(self.users.values())

    def _on_users_new(self, method, seg, q, body):
        return self._create_user(body)

    def _on_users_update(self, method, seg, q, body):
        if self.legacy or not q.get("userid"):
            return (500 if self.legacy else 400), None
        return self._rename_user(q["userid"], body["Name"])

    def _on_user_get(self, method, seg, q, body):
        return 200, self.users[seg[1]]

    def _on_user_delete(self, method, seg, q, body):
        uid = seg[1]
        if uid not in self.users:
            return (500 if self.legacy else 404), None
        self.delete_user(uid)
        return 204, None

    def _on_user_configuration(self, method, seg, q, body):
        if self.legacy:
            return 404, None  # no such route on 10.8
        if not q.get("userid"):
            return 400, None
        return self._update_configuration(q["userid"], body)

    def _on_user_configuration_legacy(self, method, seg, q, body):
        if self.legacy:
            return 500, None
        return self._update_configuration(seg[1], body)

    def _on_user_policy(self, method, seg, q, body):
        self.users[seg[1]]["Policy"] = body
        return 204, None

    def _on_playlists_listed(self, method, seg, q, body):
        if q.get("includeitemtypes") != "Playlist":
            return None
        return 200, self._playlists_of(seg[1] if len(seg) == 3 else q.get("userid"), q)

    def _on_playlist_item(self, method, seg, q, body):
        if seg[1] not in self.playlists or self.legacy:
            return None
        uid, p = q.get("userid"), self.playlists[seg[1]]
        if uid and not self._sees(uid, p):
            return 404, None  # not visible to that user
        return 200, self._playlist_dto(uid, p, set((q.get("fields") or "").split(",")), single=True)

    def _on_playlists(self, method, seg, q, body):
        return self._playlist_route(method, seg, q, body)

    def _on_plugin_configuration(self, method, seg, q, body):
        if (
            seg[1].replace("-", "").lower() != "71552a5a5c5c4350a2aeebe451a30173"
            or not self.plugin_installed
        ):
            return 404, None
        if method == "GET":
            return 200, copy.deepcopy(self.plugin_config)
        self.plugin_config = copy.deepcopy(body)
        self.plugin_saves += 1
        return 204, None

    def _on_artists(self, method, seg, q, body):
        return 200, self._items(
            {**q, "includeitemtypes": "MusicArtist"}, q.get("userid"), artists=True
        )

    def _on_items_listed(self, method, seg, q, body):
        return 200, self._items(q, seg[1] if len(seg) == 3 else q.get("userid"))

    def _on_user_toggle(self, method, seg, q, body):  # UserPlayedItems, UserFavoriteItems
        if self.legacy:
            return None
        if not q.get("userid"):
            return 400, None
        return self._toggle(seg[0], method, q["userid"], seg[1], q)

    def _on_user_item(self, method, seg, q, body):
        if self.legacy:
            return None
        if not q.get("userid"):
            return 400, None
        uid, iid = q["userid"], seg[1]
        self._row(iid), self.users[uid]  # noqa: B018 — KeyError → 404
        if seg[2] == "UserData" and method == "GET":
            return 200, self._dto(self.ud(uid, iid), iid)
        if seg[2] == "UserData" and method == "POST":
            changes = {}
            for k in (
                "PlaybackPositionTicks",
                "PlayCount",
                "IsFavorite",
                "Played",
                "LastPlayedDate",
            ):
                if body.get(k) is not None:
                    changes[k] = body[k]
            if body.get("Likes") is not None:
                changes["Rating"] = 10.0 if body["Likes"] else 1.0
            if body.get("Rating") is not None:
                changes["Rating"] = float(body["Rating"])
            return 200, self.save(uid, iid, "UpdateUserData", **changes)
        if seg[2] == "Rating":
            return self._toggle("Rating", method, uid, iid, q)
        return None

    def _on_legacy_user_toggle(self, method, seg, q, body):  # PlayedItems, FavoriteItems
        self.users[seg[1]]  # noqa: B018
        return self._toggle("User" + seg[2], method, seg[1], seg[3], q)

    def _on_legacy_user_item(self, method, seg, q, body):
        uid = seg[1]
        self.users[uid]  # noqa: B018
        item = dict(self._row(seg[3]))
        item.pop("_saved")
        item["UserData"] = self._dto(self.ud(uid, seg[3]), seg[3])
        return 200, item

    def _on_legacy_user_rating(self, method, seg, q, body):
        self.users[seg[1]]  # noqa: B018
        return self._toggle("Rating", method, seg[1], seg[3], q)

    def _on_legacy_user_other(self, method, seg, q, body):
        self.users[seg[1]]  # noqa: B018 — an unknown user fails first (500 on 10.8), as it did
        return None

    ONE = r"[^/]+"  # one segment of the path
    # (method or None for any, the path's segments joined by "/", handler), tried in order.
    ROUTES = (
        ("GET", re.compile(r"Users"), _on_users_list),
        ("POST", re.compile(r"Users/New"), _on_users_new),
        ("POST", re.compile(r"Users"), _on_users_update),  # 10.9+ update (rename) with ?userId=
        ("GET", re.compile(rf"Users/{ONE}"), _on_user_get),
        ("DELETE", re.compile(rf"Users/{ONE}"), _on_user_delete),
        # UserController.UpdateUserConfiguration (10.9+, v10.11.8): ``userId ?? User.GetUserId()``;
        # an API key has no user, so without userId GetUserById(Guid.Empty) fails (400).
        ("POST", re.compile(r"Users/Configuration"), _on_user_configuration),
        # 10.8: the only route, and RequestHelpers.AssertCanUpdateUser @v10.8.13 dereferences
        # auth.User, null for an API key: 500 (jellyfin#8287, fixed in 10.9). 10.9+: still
        # routed (UpdateUserConfigurationLegacy → UpdateUserConfiguration).
        ("POST", re.compile(rf"Users/{ONE}/Configuration"), _on_user_configuration_legacy),
        ("POST", re.compile(rf"Users/{ONE}/Policy"), _on_user_policy),
        ("GET", re.compile(r"Items"), _on_playlists_listed),  # ?includeItemTypes=Playlist only
        (None, re.compile(rf"Users/{ONE}/Items"), _on_playlists_listed),  # the same, any method
        ("GET", re.compile(rf"Items/{ONE}"), _on_playlist_item),  # 10.9+, a playlist's id only
        (None, re.compile(r"Playlists(/.*)?"), _on_playlists),
        # PluginsController: 404 for a plugin that is not installed; the POST replaces the
        # whole configuration with what it is sent.
        (None, re.compile(rf"Plugins/{ONE}/Configuration"), _on_plugin_configuration),
        # ArtistsController.GetArtists (v10.11.8, and 10.8 alike): the artists "by name", with
        # the user's data and filters (isFavorite, filters=Likes) for ?userId=.
        ("GET", re.compile(r"Artists"), _on_artists),
        ("GET", re.compile(r"Items"), _on_items_listed),
        ("GET", re.compile(rf"Users/{ONE}/Items"), _on_items_listed),
        # 10.9+ routes with ?userId= (400 without it, as an API key has no user)
        (None, re.compile(rf"(UserPlayedItems|UserFavoriteItems)/{ONE}"), _on_user_toggle),
        (None, re.compile(rf"UserItems/{ONE}/{ONE}"), _on_user_item),
        # legacy /Users/{u}/… routes: the only ones on 10.8, still routed on 10.9 → 12.0
        (
            None,
            re.compile(rf"Users/{ONE}/(PlayedItems|FavoriteItems)/{ONE}"),
            _on_legacy_user_toggle,
        ),
        ("GET", re.compile(rf"Users/{ONE}/Items/{ONE}"), _on_legacy_user_item),
        (None, re.compile(rf"Users/{ONE}/Items/{ONE}/Rating"), _on_legacy_user_rating),
        (None, re.compile(rf"Users/{ONE}/{ONE}/.+"), _on_legacy_user_other),
    )

    def _toggle(self, kind: str, method: str, uid: str, iid: str, q: dict):
        self._row(iid), self.users[uid]  # noqa: B018
        if kind == "UserPlayedItems":
            if method == "POST":
                date = q.get("dateplayed")
                if date and re.fullmatch(r"\d{14}", date):
                    date = (
                        datetime.strptime(date, "%Y%m%d%H%M%S")
                        .replace(tzinfo=UTC)
                        .strftime("%Y-%m-%dT%H:%M:%S.0000000Z")
                    )
                return 200, self.mark_played(uid, iid, date)
            return 200, self.mark_unplayed(uid, iid)
        if kind == "UserFavoriteItems":
            return 200, self.save(uid, iid, "UpdateUserRating", IsFavorite=method == "POST")
        if kind == "Rating":
            likes = q.get("likes")
            rating = (
                None if method == "DELETE" or likes is None else (10.0 if likes == "true" else 1.0)
            )
            return 200, self.save(uid, iid, "UpdateUserRating", Rating=rating)
        return 404, None

    def _items(self, q: dict, uid: str | None = None, artists: bool = False) -> dict:
        # Under the lock, as a snapshot: the service writes while it reads. (Each answer copies
        # the user data it shows; copying all of the user's first took longer than the query.)
        with self.lock:
            return self._items_now(q, uid, artists)

    def _with_data(self, uid: str) -> list[str]:
        """The ids of the items one user has data on. Indexed by user: entries are only ever
        added to ``data`` (never removed), so its size says when to index again."""
        size, index = self._keys_by_user
        if size != len(self.data):
            index = {}
            for u, i in list(self.data):
                index.setdefault(u, []).append(i)
            self._keys_by_user = (len(self.data), index)
        return index.get(uid, [])

    def _positions(self) -> dict[str, int]:
        """{item id: its place in the library}; items are only ever added, so the count says
        when to count again."""
        if len(self._position) != len(self.items):
            self._position = {iid: n for n, iid in enumerate(self.items)}
        return self._position

    @staticmethod
    def _user_data_tests(q: dict) -> list:
        """What a user's data must pass to be listed: isPlayed, isFavorite and filters=…, ANDed
        (ItemsController.GetItems → InternalItemsQuery, v10.11.8)."""
        tests = []
        if q.get("isplayed"):
            tests.append(lambda d: d["Played"] == (q["isplayed"] == "true"))
        if q.get("isfavorite"):
            tests.append(lambda d: d["IsFavorite"] == (q["isfavorite"] == "true"))
        for f in (q.get("filters") or "").split(","):
            if f == "IsPlayed":  # ItemFilter.IsPlayed, as isPlayed=true
                tests.append(lambda d: d["Played"])
            elif f == "IsResumable":
                tests.append(lambda d: d["PlaybackPositionTicks"] > 0)
            elif f == "Likes":
                tests.append(lambda d: (d["Rating"] or 0) >= 6.5)
            elif f == "Dislikes":  # ItemFilter.Dislikes: a rating below 6.5
                tests.append(lambda d: d["Rating"] is not None and d["Rating"] < 6.5)
        return tests

    def _items_now(self, q: dict, uid: str | None, artists: bool) -> dict:
        data = self.data
        ud = lambda r: data.get((uid, r["Id"]), BLANK_USER_DATA)  # noqa: E731
        tests = self._user_data_tests(q) if uid else []  # what a row's user data must pass
        if uid:
            self.users[uid]  # noqa: B018
        if q.get("ids"):  # these items, whatever the filters say
            wanted = [i.replace("-", "").lower() for i in q["ids"].split(",")]
            rows = [self._row(i) for i in wanted if i in self.items or i in self.playlists]
        elif tests and not all(t(BLANK_USER_DATA) for t in tests):
            # No item without user data can match (played, a favourite, a position, a rating):
            # filter the user's data, not every item (the reconcile benchmark's 100,000 items made
            # the fake its bottleneck), and answer in the library's order, playlists after.
            test = tests[0] if len(tests) == 1 else lambda d: all(t(d) for t in tests)
            keep = [i for i in self._with_data(uid) if test(data[(uid, i)])]
            position = self._positions()
            in_library = sorted((i for i in keep if i in position), key=position.__getitem__)
            rows = [self.items[i] for i in in_library]
            rows += [self._row(i) for i in keep if i in self.playlists]
        else:
            rows = list(self.items.values()) + [self._row(p) for p in self.playlists]
            if tests:
                rows = [r for r in rows if all(t(ud(r)) for t in tests)]
        if uid and not q.get("ids"):  # a playlist is listed to those it may see (IsVisible)
            rows = [
                r
                for r in rows
                if r["Type"] != "Playlist" or self._sees(uid, self.playlists[r["Id"]])
            ]
        if uid and not artists and not q.get("ids"):
            # An artist is an item "by name", outside every library: with a user, /Items looks only
            # in their libraries (LibraryManager.AddUserToQuery: TopParentIds = the user's views,
            # v10.11.8), so it lists no artist; /Artists does. Without a user, or by ids, it does.
            rows = [r for r in rows if r["Type"] != "MusicArtist"]
        if q.get("includeitemtypes"):
            types = set(q["includeitemtypes"].split(","))
            rows = [r for r in rows if r["Type"] in types]
        if q.get("mindatelastsavedforuser"):
            since = parse_iso(q["mindatelastsavedforuser"])
            rows = [r for r in rows if r["_saved"] >= since]
        if uid and q.get("sortby") == "DatePlayed":
            self.date_played_reads += 1
            # ItemSortBy.DatePlayed orders by the user's LastPlayedDate
            # (OrderMapper.MapOrderByField, v10.11.8; SqliteItemRepository before 10.11). Never
            # played: none, first in ascending order as SQL sorts NULL, so last in descending.
            played = lambda r: (
                parse_iso(ud(r)["LastPlayedDate"]) if ud(r)["LastPlayedDate"] else 0.0
            )  # noqa: E731
            rows.sort(key=played, reverse=q.get("sortorder") == "Descending")
        fields = set((q.get("fields") or "").split(","))
        start, limit = int(q.get("startindex", 0)), int(q.get("limit", 10**9))
        out = []
        for r in rows[start : start + limit]:
            d = {k: v for k, v in r.items() if not k.startswith("_") and v is not None}
            if "Path" not in fields:
                d.pop("Path", None)
            if "ProviderIds" not in fields:
                d.pop("ProviderIds", None)
            if uid and q.get("enableuserdata") != "false":
                d["UserData"] = self._dto(ud(r), r["Id"])
            out.append(d)
        return {"Items": out, "TotalRecordCount": len(out), "StartIndex": start}


# ── Service harness ──────────────────────────────────────────────────────────


class LeanClient:
    """A keep-alive HTTP/1.1 client for the benchmarks. Jellyfin's sender is .NET, not Python:
    http.client would spend as much CPU as the service does, on the same two cores."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.replies = self.sock.makefile("rb")

    def post(self, path: str, body: bytes) -> int:
        head = (
            b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain; charset=utf-8\r\n"
            % path.encode()
        )
        self.sock.sendall(head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        status = int(self.replies.readline().split()[1])
        length = 0
        while (line := self.replies.readline()) not in (b"\r\n", b""):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        self.replies.read(length)
        return status

    def close(self) -> None:
        self.sock.close()


def memory_mb(pid: int, key: str = "VmRSS") -> float:
    """A process's resident memory now (VmRSS) or at its peak (VmHWM), from /proc."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+)", text).group(1)) / 1024


def free_port() -> int:
    """A port free on every address, below the range outgoing connections take their local
    ports from: a port the kernel hands out (bind to 0) may meanwhile become the local end of a
    connection to a fake server, and the service, binding it later, finds it in use."""
    import random

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randrange(10000, max(low, 10001))
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TEST_API_TOKEN = "test-api-token-0123456789"


def write_config(
    tmp: Path, fakes: list[FakeJellyfin], port: int = 0, log_level: str = "INFO", **sync
) -> Path:
    import yaml

    cfg = {
        "servers": [{"name": f.name, "url": f.url, "api_key": f.api_key} for f in fakes],
        "sync": {
            "progress_debounce_seconds": 0.3,
            "worker_interval_seconds": 0.5,
            "retry_base_seconds": 0.2,
            "index_refresh_seconds": 0,
            "max_retries": 5,
            **sync,
        },
        "database": {"path": str(tmp / "sync.db")},
        # Tests start passes themselves; the recent check only where a test turns it on.
        "reconcile": {"on_startup": False, "interval_minutes": 0, "recent_check_seconds": 0},
        # Removals settle briefly (the brake's tests set the real settling time themselves).
        "safety": {"removal_delay_seconds": 0.3},
        # Changes need the API token or a sign-in (issue 22.1): Running.call sends this token.
        "server": {"host": "127.0.0.1", "port": port or 8080, "api_token": TEST_API_TOKEN},
        "logging": {"level": log_level},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


class StoppableListener(jds.PerAddressListener):
    """The service's listener, and a way for a test to stop Waitress from its own thread: accept()
    runs in Waitress' loop thread, and a SystemExit raised there ends run() as Ctrl-C would, after
    the requests under way have finished (Waitress' documented create_server and run only)."""

    stopping = False

    def accept(self):
        if self.stopping:
            raise SystemExit(0)
        return super().accept()

    def stop(self) -> None:
        """Ends the loop: the connection made here wakes it, and it calls accept()."""
        if self.stopping or self.fileno() == -1:  # stopped before, or closed
            return
        self.stopping = True
        # Reset when the loop, woken by another connection first, has closed us already.
        with contextlib.suppress(OSError):
            socket.create_connection(self.getsockname()[:2], timeout=5).close()


class Running:
    """The real service, in-process, served by Waitress on a free port."""

    def __init__(self, config: jds.Config, path: Path | None = None):
        # As serve() runs it: behind a ServiceSwitch, so settings saved on /setup apply in place.
        self.switch = jds.ServiceSwitch(str(path or "config.yaml"))
        service = jds.Service(config, str(path), self.switch.run) if path else jds.Service(config)
        self.switch.service, self.switch.app = service, service.app
        self.script_token = ""  # see credentials
        self.connections: dict = {}  # Waitress' map: the listener and every open connection
        [self.listener] = StoppableListener.on("127.0.0.1", 0)
        self.server = service.server = jds.make_waitress(
            self.switch,
            "127.0.0.1",
            0,
            listeners=[self.listener],
            socket_map=self.connections,
        )
        self.port = self.server.effective_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self._serve, daemon=True, name="waitress")
        self.thread.start()
        self.service.start_workers()

    def _serve(self) -> None:
        self.server.run()  # until stop(): Waitress lets the requests under way finish
        # All closed in this thread, the loop's, now that nothing else uses them.
        self.server.close()  # the listener and Waitress' wake-up pipe
        for connection in list(self.connections.values()):
            connection.close()

    @property
    def service(self) -> jds.Service | None:
        """The service of the moment (another one after a settings save)."""
        return self.switch.service

    @property
    def store(self) -> jds.Store:
        return self.service.store

    def stop(self) -> None:
        self.listener.stop()
        self.thread.join(10)
        self.service.stop()

    def call(
        self,
        method: str,
        path: str,
        body: bytes | str | dict | None = None,
        headers: dict | None = None,
    ):
        conn = HTTPConnection("127.0.0.1", self.port, timeout=10)
        headers = {**self.credentials(method, path, headers or {}), **(headers or {})}
        if isinstance(body, dict):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        conn.request(
            method, path, body, {"Content-Type": "text/plain; charset=utf-8", **(headers or {})}
        )
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        try:
            parsed = json.loads(data) if data else None
        except ValueError:
            parsed = data.decode()
        return resp.status, parsed

    @classmethod
    def of(cls, port: int, token: str = "") -> Running:
        """Only the calls, to the service running as a process of its own on ``port``; writes
        carry ``token`` as a script's would."""
        running = cls.__new__(cls)
        running.switch = jds.ServiceSwitch("")  # no service in this process
        running.port, running.script_token = port, token
        return running

    def credentials(self, method: str, path: str, headers: dict) -> dict:
        """A change posted without a sign-in of its own carries the config's API token, as a
        script would (without one it is refused: issue 22.1). With server.auth the sign-in
        tests say how they sign in, unless ``script_token`` is set: then every call sends it."""
        if {h.lower() for h in headers} & {"authorization", "cookie"} or path.startswith(
            "/webhook"
        ):
            return {}
        token = self.script_token
        config = self.service.config if self.service else None  # a process's (Running.of) has none
        if not token and config and method not in ("GET", "HEAD") and not config.auth_username:
            token = config.api_token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def idle(self) -> bool:
        q = self.call("GET", "/api/queue")[1]
        return q["pending_events"] == 0 and q["processing_events"] == 0


LIBRARY = [
    # name, type, path, provider ids
    (
        "Arrival",
        "Movie",
        "/media/movies/Arrival (2016)/Arrival.mkv",
        {"Tmdb": "329865", "Imdb": "tt2543164"},
    ),
    ("Dune", "Movie", "/media/movies/Dune (2021)/Dune.mkv", {"Tmdb": "438631"}),
    ("Heat", "Movie", "/media/movies/Heat (1995)/Heat.mkv", {"Imdb": "tt0113277"}),
]


class Cluster:
    def __init__(
        self,
        tmp: Path,
        versions=("10.10.7", "10.11.8", "12.0.0"),
        users=("alice", "bob"),
        policies=None,
        start=True,
        extra=None,
        **sync,
    ):
        self.tmp = tmp
        self.fakes = [
            FakeJellyfin(n, v)
            for n, v in zip(("home", "parents", "public"), versions, strict=False)
        ]
        for f in self.fakes:
            for u in users:
                f.add_user(u.capitalize() if f.name == "public" else u)  # names differ only in case
            for name, type_, path, prov in LIBRARY:
                f.add_item(
                    name,
                    type_,
                    path,
                    provider_ids=prov,
                    year=int(re.search(r"\((\d{4})\)", path)[1]),
                )
        self.config_path = write_config(tmp, self.fakes, **sync)
        if policies or extra:
            import yaml

            data = yaml.safe_load(self.config_path.read_text())
            if policies:
                data["path_sync_policy"] = policies
            for key, value in (extra or {}).items():
                if isinstance(value, dict) and isinstance(data.get(key), dict):
                    data[key].update(value)
                elif key == "servers":
                    for srv, fields in value.items():
                        next(d for d in data["servers"] if d["name"] == srv).update(fields)
                else:
                    data[key] = value
            self.config_path.write_text(yaml.safe_dump(data))
        self.config = jds.load_config(self.config_path)
        self.svc: Running | None = None
        if start:
            self.start()

    def start(self) -> Running:
        self.svc = Running(self.config, self.config_path)
        for f in self.fakes:
            f.webhook_url = f"{self.svc.url}/webhook/{f.name}"
        eventually(
            lambda: all(h["reachable"] for h in self.svc.service.syncer.health.values()),
            what="servers up",
        )
        return self.svc

    def __getitem__(self, name: str) -> FakeJellyfin:
        return next(f for f in self.fakes if f.name == name)

    def settle(self, timeout: float = 15.0) -> None:
        """Wait until every echo is delivered and the queue is empty, with nothing asked of or
        sent by the fakes while we looked: a write finishing between the two looks (echoes
        first, then the queue) starts an echo that the first look has already passed."""

        def activity():
            return [
                (len(f.requests), f.writes_refused, len(f.echo_threads), f.webhooks_sent)
                for f in self.fakes
            ]

        def calm():
            before = activity()
            return all(f.quiet() for f in self.fakes) and self.svc.idle() and activity() == before

        eventually(calm, timeout, what="the sync to settle")

    def close(self):
        if self.svc:
            self.svc.stop()
        for f in self.fakes:
            f.close()


@pytest.fixture
def fake_servers():
    """Fake Jellyfin servers for one test — names, or (name, version) pairs — closed when the
    test ends, pass or fail."""
    made: list[FakeJellyfin] = []

    def make(*specs: str | tuple[str, str]) -> list[FakeJellyfin]:
        fakes = [FakeJellyfin(*((spec,) if isinstance(spec, str) else spec)) for spec in specs]
        made.extend(fakes)
        return fakes

    yield make
    for f in made:
        f.close()


@pytest.fixture
def cluster(tmp_path):
    clusters = []

    def make(**kw) -> Cluster:
        c = Cluster(tmp_path / f"c{len(clusters)}", **kw)
        clusters.append(c)
        return c

    (tmp_path / "c0").mkdir()
    for i in range(1, 4):
        (tmp_path / f"c{i}").mkdir()
    yield make
    for c in clusters:
        c.close()


# ── Watch state between servers ──────────────────────────────────────────────


def test_watched_on_one_server_appears_on_the_others(cluster):
    c = cluster()
    c["home"].user_marks("alice", "Arrival", True)
    for name in ("parents", "public"):
        eventually(lambda n=name: c[n].ud("alice", "Arrival")["Played"], what=f"played on {name}")
    c.settle()
    assert c["parents"].ud("alice", "Arrival")["PlaybackPositionTicks"] == 0
    assert c["parents"].ud("alice", "Arrival")["PlayCount"] == 1
    assert not c["parents"].ud("bob", "Arrival")["Played"], "another user's state must not change"
    assert not c["home"].ud("alice", "Dune")["Played"]


def test_unwatched_favourite_and_likes_follow_each_way(cluster):
    c = cluster()
    home, parents, public = c["home"], c["parents"], c["public"]
    home.user_marks("alice", "Dune", True)
    c.settle()
    public.user_marks("alice", "Dune", False)  # a real change on another server
    c.settle()
    assert not home.ud("alice", "Dune")["Played"] and not parents.ud("alice", "Dune")["Played"]

    parents.user_favourites("bob", "Heat", True)
    c.settle()
    assert home.ud("bob", "Heat")["IsFavorite"] and public.ud("bob", "Heat")["IsFavorite"]
    home.user_favourites("bob", "Heat", False)
    c.settle()
    assert (
        not parents.ud("bob", "Heat")["IsFavorite"] and not public.ud("bob", "Heat")["IsFavorite"]
    )

    public.user_rates("alice", "Arrival", True)
    c.settle()
    assert (
        home.ud("alice", "Arrival")["Rating"] == 10.0
        and parents.ud("alice", "Arrival")["Rating"] == 10.0
    )
    home.user_rates("alice", "Arrival", False)
    c.settle()
    assert (
        parents.ud("alice", "Arrival")["Rating"] == 1.0
        and public.ud("alice", "Arrival")["Rating"] == 1.0
    )
    parents.user_rates("alice", "Arrival", None)
    c.settle()
    assert (
        home.ud("alice", "Arrival")["Rating"] is None
        and public.ud("alice", "Arrival")["Rating"] is None
    )


def test_resume_position_follows_and_a_burst_becomes_one_write(cluster):
    c = cluster(progress_debounce_seconds=1.0)
    home, parents = c["home"], c["parents"]
    before = parents.writes()
    positions = [i * 10 * 10**7 for i in range(1, 31)]  # 30 progress reports
    home.user_plays("alice", "Heat", positions)
    c.settle()
    assert parents.ud("alice", "Heat")["PlaybackPositionTicks"] == positions[-1]
    assert c["public"].ud("alice", "Heat")["PlaybackPositionTicks"] == positions[-1]
    assert parents.writes() - before == 1, "30 progress reports and a stop must give one write"
    assert not parents.ud("alice", "Heat")["Played"]


def test_progress_reports_planned_together_keep_the_newest_whatever_their_order(
    tmp_path, fake_servers
):
    # The planner skips all but the newest report per item in a batch without planning them:
    # "newest" is the time the source observed, not the order they arrived in.
    fakes = fake_servers("home", "parents")
    home = fakes[0]
    uid, iid = home.add_user("alice"), home.add_item("Heat", "Movie", "/media/movies/Heat.mkv")
    fakes[1].add_user("alice")
    service = jds.Service(
        jds.load_config(write_config(tmp_path, fakes, progress_debounce_seconds=60))
    )
    try:
        t0 = time.time()
        for ticks, age in ((3 * 10**9, 1.0), (9 * 10**9, 0.0), (5 * 10**9, 2.0), (7 * 10**9, 0.5)):
            body = home.payload(
                "PlaybackProgress",
                uid,
                iid,
                home.ud(uid, iid),
                PlaybackPositionTicks=ticks,
                UtcTimestamp=iso(t0 - age),
            )
            assert (
                service.syncer.accept_webhook("home", json.dumps(body).encode())["status"]
                == "queued"
            )
        assert service.syncer.plan_pending() == 4  # one batch: the planner thread is not running
        jobs = service.store._rows("SELECT target, value FROM jobs WHERE field = 'position'")
        assert [(j["target"], json.loads(j["value"])) for j in jobs] == [("parents", 9 * 10**9)]
        assert service.store.count_unplanned() == 0
    finally:
        service.stop()
        for f in fakes:
            f.close()


def test_finished_playback_marks_played(cluster):
    c = cluster()
    c["home"].user_plays("bob", "Dune", [600 * 10**7, 7000 * 10**7], completed=True)
    c.settle()
    for name in ("parents", "public"):
        ud = c[name].ud("bob", "Dune")
        assert ud["Played"] and ud["PlaybackPositionTicks"] == 0


def test_rewatching_does_not_unmark_played(cluster):
    c = cluster()
    home, parents = c["home"], c["parents"]
    home.user_marks("alice", "Arrival", True)
    c.settle()
    assert parents.ud("alice", "Arrival")["Played"]
    # Starting it again: the server itself reports Played=false (PlaybackStart), then progress.
    home.user_plays("alice", "Arrival", [300 * 10**7, 600 * 10**7])
    c.settle()
    assert not home.ud("alice", "Arrival")["Played"], (
        "the fake reproduces Jellyfin's re-watch behaviour"
    )
    assert parents.ud("alice", "Arrival")["Played"], (
        "a re-watch must not mark it unwatched elsewhere"
    )
    assert c["public"].ud("alice", "Arrival")["Played"]


def test_echoes_die_out_one_write_per_target(cluster):
    c = cluster()
    before = {f.name: f.writes() for f in c.fakes}
    c["home"].user_marks("alice", "Heat", True)
    c["home"].user_favourites("alice", "Heat", True)
    c.settle()
    after = {f.name: f.writes() - before[f.name] for f in c.fakes}
    # home's own changes were made by the "user", not by us: we write nothing back to it.
    assert after == {"home": 0, "parents": 2, "public": 2}, after
    sent = sum(f.webhooks_sent for f in c.fakes)
    c.settle()  # a ping-pong never settles; once settled, nothing is left in flight to echo
    assert sum(f.webhooks_sent for f in c.fakes) == sent, "no ping-pong: the echoes stopped"


def test_an_older_event_arriving_late_never_wins(cluster):
    c = cluster()
    home, parents = c["home"], c["parents"]
    svc = c.svc
    uid, iid = home.user("alice"), home.item("Dune")
    parents.mark_played(
        parents.user("alice"), parents.item("Dune")
    )  # so "unplayed" is a change there
    c.settle()
    assert home.ud(uid, iid)["Played"]
    # Both events below are newer than that change (dated ahead of our clock, as a server's clock
    # may be, within CLOCK_SKEW_ALLOWANCE: no waiting for ours); they arrive in reverse order.
    t0 = time.time() + 1.0
    newer = home.payload(
        "UserDataSaved",
        uid,
        iid,
        dict(home.ud(uid, iid), Played=False),
        SaveReason="TogglePlayed",
        UtcTimestamp=iso(t0),
    )
    older = home.payload(
        "UserDataSaved",
        uid,
        iid,
        dict(home.ud(uid, iid), Played=True, PlayCount=1),
        SaveReason="TogglePlayed",
        UtcTimestamp=iso(t0 - 0.5),
    )
    assert svc.call("POST", "/webhook/home", newer)[0] == 202
    assert svc.call("POST", "/webhook/home", older)[0] == 202
    c.settle()
    assert not parents.ud("alice", "Dune")["Played"], (
        "the older 'played' must not overwrite the newer 'unplayed'"
    )


def test_forty_episodes_marked_played_at_once(cluster):
    c = cluster()
    series_ids = {}
    for f in c.fakes:
        series_ids[f.name] = f.add_item(
            "Show", "Series", "/media/tv/Show", provider_ids={"Tvdb": "81189"}
        )
        for e in range(1, 41):
            f.add_item(
                f"Episode {e}",
                "Episode",
                f"/media/tv/Show/S01E{e:02d}.mkv",
                runtime=2700 * 10**7,
                series_id=series_ids[f.name],
                season=1,
                episode=e,
            )
    home = c["home"]
    uid = home.user("bob")
    episodes = [i for i, d in home.items.items() if d["Type"] == "Episode"]
    with ThreadPoolExecutor(8) as pool:  # the plugin delivers a series' events concurrently
        list(pool.map(lambda iid: home.mark_played(uid, iid), episodes))
    c.settle(30)
    for name in ("parents", "public"):
        played = [e for e in range(1, 41) if c[name].ud("bob", f"Episode {e}")["Played"]]
        assert len(played) == 40, f"{name}: {len(played)} of 40"
    # Named the way people know them, series first.
    entries = c.svc.call("GET", "/api/sync-log?target=parents&result=ok&limit=100")[1]["entries"]
    assert "Show — S01E07 — Episode 7" in {e["item_name"] for e in entries}


def test_matching_falls_back_to_provider_ids_then_series_and_episode(cluster):
    c = cluster()
    home, parents = c["home"], c["parents"]
    # Different folder layouts: paths do not match; the movie carries an IMDb ID.
    home.add_item("Alien", "Movie", "/data/films/Alien.mkv", provider_ids={"Imdb": "tt0078748"})
    parents.add_item(
        "Alien", "Movie", "/mnt/cinema/Alien (1979).mkv", provider_ids={"Imdb": "tt0078748"}
    )
    # Episodes without IDs of their own; their series share a TVDb ID.
    hs = home.add_item("Lost", "Series", "/data/tv/Lost", provider_ids={"Tvdb": "73739"})
    ps = parents.add_item(
        "LOST (2004)", "Series", "/mnt/shows/LOST (2004)", provider_ids={"Tvdb": "73739"}
    )
    home.add_item("Pilot", "Episode", "/data/tv/Lost/1x01.mkv", series_id=hs, season=1, episode=1)
    parents.add_item(
        "Pilot (1)",
        "Episode",
        "/mnt/shows/LOST (2004)/S01E01.mkv",
        series_id=ps,
        season=1,
        episode=1,
    )
    parents.add_item(
        "Wrong", "Episode", "/mnt/shows/LOST (2004)/S01E02.mkv", series_id=ps, season=1, episode=2
    )
    home.user_marks("alice", "Alien", True)
    home.user_marks("alice", "Pilot", True)
    c.settle()
    assert parents.ud("alice", "Alien")["Played"]
    assert parents.ud("alice", "Pilot (1)")["Played"]
    assert not parents.ud("alice", "Wrong")["Played"]


def test_an_item_imported_late_waits_then_syncs(cluster):
    c = cluster(
        policies=[
            {"prefix": "/media/new", "absent_retry_count": -1, "retry_delay_seconds": 0.5},
            {"prefix": "/media/gone", "absent_retry_count": 1, "retry_delay_seconds": 0.2},
        ]
    )
    home, parents = c["home"], c["parents"]
    home.add_item("Nope", "Movie", "/media/new/Nope.mkv")
    home.add_item("Lost Film", "Movie", "/media/gone/Lost.mkv")
    home.user_marks("alice", "Nope", True)
    home.user_marks("alice", "Lost Film", True)
    waiting = eventually(
        lambda: [
            j
            for j in c.svc.call("GET", "/api/events/waiting")[1]
            if j["target_server"] == "parents" and j["item_name"].startswith("Nope")
        ],
        what="a waiting job",
    )
    assert "not found" in waiting[0]["last_error"]
    failed = eventually(lambda: c.svc.call("GET", "/api/events/failed")[1], what="the skipped job")
    # Waited for as its policy said, then given up: skipped, with why (issue 21.5).
    assert any(
        j["item_name"].startswith("Lost Film")
        and j["state"] == "skipped"
        and "gave up waiting" in j["last_error"]
        for j in failed
    )
    parents.add_item("Nope", "Movie", "/media/new/Nope.mkv")  # the library scan finds it
    eventually(lambda: parents.ud("alice", "Nope")["Played"], what="the late item to sync")


@pytest.mark.slow
def test_a_waiting_change_lands_at_its_first_retry_after_the_item_appears_without_item_added(
    cluster,
):
    # ItemAdded is the plugin's least reliable event (often not even ticked): a waiting change
    # must not depend on it. Here the index would otherwise be refreshed only hourly.
    c = cluster(
        index_refresh_seconds=3600,
        policies=[{"prefix": "/media/new", "absent_retry_count": -1, "retry_delay_seconds": 1.0}],
    )
    home, parents, public = c["home"], c["parents"], c["public"]
    for name in ("Nope", "Also new"):
        home.add_item(name, "Movie", f"/media/new/{name}.mkv")
    home.user_marks("alice", "Nope", True)
    home.user_marks("bob", "Also new", True)
    eventually(
        lambda: (
            len(
                [
                    j
                    for j in c.svc.call("GET", "/api/events/waiting")[1]
                    if j["target_server"] == "parents"
                ]
            )
            == 2
        ),
        what="two changes waiting on parents",
    )
    tries = lambda: {  # noqa: E731 - the not-found count of each change waiting on parents
        j["item_name"]: j["item_not_found_count"]
        for j in c.svc.call("GET", "/api/events/waiting")[1]
        if j["target_server"] == "parents"
    }
    eventually(
        lambda: min(tries().values(), default=0) >= 2, what="a retry round that finds nothing yet"
    )
    index_reads = lambda: sum(1 for _, path in parents.requests if path == "/Items")  # noqa: E731
    before_reads, before_tries = index_reads(), tries()
    for name in ("Nope", "Also new"):  # the library scan finds them; no ItemAdded is sent
        parents.add_item(name, "Movie", f"/media/new/{name}.mkv")
        public.add_item(name, "Movie", f"/media/new/{name}.mkv")
    eventually(
        lambda: parents.ud("alice", "Nope")["Played"] and parents.ud("bob", "Also new")["Played"],
        10,
    )
    # At the first retry after the item appeared (one more at most, if a retry was under way).
    after = dict(
        c.svc.store._rows("SELECT item_name, absent_count FROM jobs WHERE target='parents'")
    )
    for name, count in before_tries.items():
        assert after[name] <= count + 1, (name, count, after[name])
    # One cheap index read per retry round on that server, shared by both waiting changes.
    assert index_reads() - before_reads <= 2


def test_versions_use_their_own_routes(cluster):
    c = cluster(versions=("10.8.13", "10.10.7", "12.0.0"))
    old, mid, new = c["home"], c["parents"], c["public"]
    mid.user_marks("alice", "Arrival", True)
    mid.user_favourites("alice", "Arrival", True)
    c.settle()
    assert old.ud("alice", "Arrival")["Played"] and old.ud("alice", "Arrival")["IsFavorite"]
    assert new.ud("alice", "Arrival")["Played"] and new.ud("alice", "Arrival")["IsFavorite"]
    old_paths = [p for m, p in old.requests if m != "GET"]
    assert old_paths and all(p.startswith("/Users/") for p in old_paths), old_paths
    new_paths = [p for m, p in new.requests if m != "GET"]
    assert new_paths and not any(p.startswith("/Users/") for p in new_paths), new_paths
    # A resume position cannot be written to 10.8 with an API key: reported, not dropped silently.
    mid.user_plays("bob", "Heat", [900 * 10**7])
    c.settle()
    assert new.ud("bob", "Heat")["PlaybackPositionTicks"] == 900 * 10**7
    skipped = c.svc.call("GET", "/api/events/failed")[1]
    assert any(j["target_server"] == "home" and "10.8" in j["last_error"] for j in skipped)
    status = c.svc.call("GET", "/api/status")[1]
    assert any(
        "10.8" in lim for s in status["servers"] if s["name"] == "home" for lim in s["limits"]
    )


def test_a_server_that_is_down_gets_the_change_when_it_is_back(cluster):
    c = cluster()
    parents = c["parents"]
    parents.status_override = 503
    c["home"].user_marks("alice", "Heat", True)
    eventually(
        lambda: c["public"].ud("alice", "Heat")["Played"], what="the healthy server is not delayed"
    )
    waiting = eventually(
        lambda: [
            j
            for j in c.svc.call("GET", "/api/events/waiting")[1]
            if j["target_server"] == "parents"
        ],
        what="the change waiting for parents",
    )
    assert "503" in waiting[0]["last_error"] and waiting[0]["state"] == "unreachable"
    assert waiting[0]["retry_count"] == 0  # a server that is down uses up no retries
    parents.status_override = None
    eventually(lambda: parents.ud("alice", "Heat")["Played"], what="the change after recovery")


def test_retries_end_in_failed_and_can_be_retried(cluster):
    c = cluster(max_retries=1)
    parents = c["parents"]
    parents.writes_fail = True  # it answers, but refuses the writes: a true failure
    c["home"].user_favourites("bob", "Dune", True)
    failed = eventually(
        lambda: [
            j
            for j in c.svc.call("GET", "/api/events/failed")[1]
            if j["status"] == "failed" and j["field"] == "favorite"
        ],
        what="a failed job",
    )
    assert not c["parents"].ud("bob", "Dune")["IsFavorite"]
    parents.writes_fail = False
    status, body = c.svc.call("POST", f"/api/events/{failed[0]['id']}/retry")
    assert status == 200 and body["success"]
    eventually(lambda: parents.ud("bob", "Dune")["IsFavorite"], what="the retried job")
    assert c.svc.call("POST", "/api/events/999999/retry")[0] == 404


def test_switched_off_kinds_are_not_synced(cluster):
    c = cluster(favorites=False)
    c["home"].user_favourites("alice", "Dune", True)
    c["home"].user_marks("alice", "Dune", True)
    c.settle()
    assert c["parents"].ud("alice", "Dune")["Played"]
    assert not c["parents"].ud("alice", "Dune")["IsFavorite"]


# ── Users ────────────────────────────────────────────────────────────────────

TOKEN = "api-token-for-tests"


def test_a_new_user_is_created_everywhere_and_the_password_is_shown_once(cluster, caplog):
    caplog.set_level("DEBUG", logger="jellyfin_db_sync")
    c = cluster(
        extra={"servers": {"parents": {"passwordless": True}}, "server": {"api_token": TOKEN}}
    )
    home, parents, public = c["home"], c["parents"], c["public"]
    home.admin_creates_user("carol", "her-own-password")
    eventually(
        lambda: any(d["Name"] == "carol" for d in parents.users.values()), what="carol on parents"
    )
    eventually(
        lambda: any(d["Name"] == "carol" for d in public.users.values()), what="carol on public"
    )
    c.settle()
    assert parents.passwords[parents.user("carol")] == "", "a passwordless server gets no password"
    generated = public.passwords[public.user("carol")]
    assert len(generated) >= 16 and generated != "her-own-password"
    assert sum(d["Name"].casefold() == "carol" for d in home.users.values()) == 1, "no echo loop"

    assert c.svc.call("GET", "/api/users/passwords")[0] == 401
    assert (
        c.svc.call("GET", "/api/users/passwords", headers={"Authorization": "Bearer wrong"})[0]
        == 401
    )
    status, shown = c.svc.call(
        "GET", "/api/users/passwords", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert status == 200 and [(p["server"], p["username"], p["password"]) for p in shown] == [
        ("public", "carol", generated)
    ]
    matrix = c.svc.call("GET", "/api/users")[1]
    carol = next(u for u in matrix["users"] if u["person"] == "carol")
    assert (
        all(carol["servers"][n] for n in ("home", "parents", "public"))
        and matrix["passwords_pending"] == 1
    )
    others = [
        c.svc.call("GET", p)[1]
        for p in ("/api/status", "/api/users", "/api/sync-log", "/api/events/failed")
    ]
    assert generated not in json.dumps(others) and generated not in caplog.text
    status, _ = c.svc.call(
        "POST",
        f"/api/users/passwords/{shown[0]['id']}/ack",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert status == 200
    assert (
        c.svc.call("GET", "/api/users/passwords", headers={"Authorization": f"Bearer {TOKEN}"})[1]
        == []
    )
    assert c.svc.store._rows("SELECT count(*) FROM passwords")[0][0] == 0
    # …and gone from the files on disk, the write-ahead log included.
    for suffix in ("", "-wal"):
        path = c.tmp / f"sync.db{suffix}"
        assert not path.exists() or generated.encode() not in path.read_bytes(), (
            f"password left in {path.name}"
        )


def test_disabled_mode_creates_accounts_without_password_and_disabled(cluster):
    c = cluster(extra={"users": {"new_user_password": "disabled"}})
    c["home"].admin_creates_user("dave")
    eventually(
        lambda: any(d["Name"] == "dave" for d in c["public"].users.values()), what="dave on public"
    )
    dave = c["public"].users[c["public"].user("dave")]
    eventually(lambda: dave["Policy"].get("IsDisabled"), what="dave disabled")
    assert c["public"].passwords[dave["Id"]] == ""
    assert c.svc.call("GET", "/api/users/passwords")[0] == 401  # without the api_token


def test_a_deleted_user_goes_everywhere_but_an_administrator_is_never_deleted(cluster):
    c = cluster()
    home, parents, public = c["home"], c["parents"], c["public"]
    public.users[public.user("bob")]["Policy"]["IsAdministrator"] = True
    home.delete_user(home.user("bob"))
    eventually(
        lambda: not any(d["Name"] == "bob" for d in parents.users.values()),
        what="bob gone on parents",
    )
    failed = eventually(
        lambda: [
            j for j in c.svc.call("GET", "/api/events/failed")[1] if j["target_server"] == "public"
        ],
        what="the refusal",
    )
    assert "administrator" in failed[0]["last_error"]
    assert any(d["Name"] == "Bob" for d in public.users.values())
    c.settle()
    assert any(d["Name"] == "alice" for d in parents.users.values())


def test_user_deletion_can_be_switched_off(cluster):
    c = cluster(extra={"users": {"delete": False}})
    c["home"].delete_user(c["home"].user("bob"))
    c.settle()
    assert any(d["Name"] == "bob" for d in c["parents"].users.values())


def test_a_rename_follows_where_the_version_allows(cluster):
    c = cluster(versions=("10.10.7", "12.0.0", "10.8.13"))
    home, parents, public = c["home"], c["parents"], c["public"]
    home.admin_renames_user("alice", "alice.m")
    eventually(
        lambda: any(d["Name"] == "alice.m" for d in parents.users.values()), what="renamed on 12.0"
    )
    failed = eventually(
        lambda: [
            j for j in c.svc.call("GET", "/api/events/failed")[1] if j["target_server"] == "public"
        ],
        what="10.8 reported",
    )
    assert "10.8" in failed[0]["last_error"]
    assert any(d["Name"] == "Alice" for d in public.users.values()), "10.8 keeps the old name"
    c.settle()
    assert sum(d["Name"].casefold().startswith("alice") for d in home.users.values()) == 1


def test_mapped_names_share_watch_state(cluster):
    c = cluster(extra={"users": {"map": [{"home": "alice", "parents": "Alice.Smith"}]}})
    home, parents = c["home"], c["parents"]
    parents.users[parents.user("alice")]["Name"] = "Alice.Smith"
    home.user_marks("alice", "Heat", True)
    c.settle()
    assert parents.ud("Alice.Smith", "Heat")["Played"]
    assert c["public"].ud("alice", "Heat")["Played"]
    parents.user_favourites("Alice.Smith", "Dune", True)
    c.settle()
    assert home.ud("alice", "Dune")["IsFavorite"]


def test_include_and_exclude_lists(cluster):
    c = cluster(extra={"users": {"exclude": ["BOB"]}})
    c["home"].user_marks("bob", "Heat", True)
    c["home"].user_marks("alice", "Heat", True)
    c.settle()
    assert c["parents"].ud("alice", "Heat")["Played"]
    assert not c["parents"].ud("bob", "Heat")["Played"]


def test_case_variant_duplicates_are_reported_not_guessed(cluster):
    c = cluster(start=False)
    public = c["public"]
    public.add_user("ALICE")  # an old database: "Alice" and "ALICE" side by side
    c.start()
    c["home"].user_marks("alice", "Dune", True)
    c.settle()
    assert c["parents"].ud("alice", "Dune")["Played"]
    assert not any(d["Played"] for (u, _i), d in public.data.items())
    failed = c.svc.call("GET", "/api/events/failed")[1]
    assert any(
        j["target_server"] == "public" and "several users" in j["last_error"] for j in failed
    )


# ── Reconciliation ───────────────────────────────────────────────────────────

MIN = 60 * 10**7  # one minute in ticks


def quietly(fake: FakeJellyfin, user: str, item: str, **changes) -> None:
    """Change a user's data with no webhook: what happens while the service is down, a restore…"""
    with fake.lock:
        fake.ud(user, item).update(changes)


def reconcile(c: Cluster, dry_run: bool = False) -> dict:
    before = c.svc.call("GET", "/api/reconcile")[1]
    status, _ = c.svc.call("POST", "/api/reconcile" + ("?dry_run=1" if dry_run else ""))
    assert status == 202

    def finished():
        now = c.svc.call("GET", "/api/reconcile")[1]
        key = "last_dry_run" if dry_run else "last_report"
        if now["progress"].get("running") or not now[key] or now[key] == before[key]:
            return None
        return now[key]

    report = eventually(finished, 30, 0.05, "a reconciliation pass")
    c.settle()
    return report


def snapshot(c: Cluster) -> dict:
    return {
        f.name: json.dumps({"|".join(k): v for k, v in f.data.items()}, sort_keys=True)
        for f in c.fakes
    }


def test_first_reconciliation_is_a_union_and_unmarks_nothing(cluster):
    c = cluster(start=False)
    home, parents, public = c["home"], c["parents"], c["public"]
    quietly(
        home, "alice", "Arrival", Played=True, PlayCount=1, LastPlayedDate=iso(time.time() - 86400)
    )
    quietly(home, "alice", "Dune", IsFavorite=True)
    quietly(parents, "alice", "Heat", Played=True, PlayCount=3, LastPlayedDate=iso())
    quietly(parents, "alice", "Dune", PlaybackPositionTicks=30 * MIN, LastPlayedDate=iso())
    quietly(
        public,
        "alice",
        "Dune",
        PlaybackPositionTicks=10 * MIN,
        LastPlayedDate=iso(time.time() - 3600),
    )
    quietly(public, "alice", "Heat", Rating=10.0)
    quietly(
        public, "bob", "Heat", Rating=1.0
    )  # bob dislikes it there: liked nowhere, so nothing to union
    c.start()
    report = reconcile(c)
    assert report["changes"] > 0 and not report["errors"]
    for f in c.fakes:
        assert f.ud("alice", "Arrival")["Played"], f.name
        assert f.ud("alice", "Heat")["Played"], f.name
        assert f.ud("alice", "Dune")["IsFavorite"], f.name
        assert f.ud("alice", "Dune")["PlaybackPositionTicks"] == 30 * MIN, f.name  # the furthest
        assert f.ud("alice", "Heat")["Rating"] == 10.0, f.name
        assert not f.ud("alice", "Dune")["Played"], f.name
    assert parents.ud("alice", "Heat")["PlayCount"] == 3, "counts are never summed"
    assert home.ud("alice", "Heat")["PlayCount"] == 3, "PlayCount = the larger of the two"
    # A second pass finds everything in agreement.
    assert reconcile(c)["changes"] == 0


def test_a_one_sided_change_after_the_baseline_wins_and_unplayed_propagates(cluster):
    c = cluster()
    for f in c.fakes:
        quietly(
            f, "alice", "Arrival", Played=True, PlayCount=1, LastPlayedDate=iso(time.time() - 7200)
        )
        quietly(f, "bob", "Heat", Played=True, PlayCount=2, LastPlayedDate=iso(time.time() - 7200))
    assert reconcile(c)["changes"] == 0  # the baseline: everyone agrees
    quietly(
        c["parents"], "alice", "Arrival", Played=False, PlayCount=0, LastPlayedDate=None
    )  # "mark unplayed"
    # A re-watch in progress on home: Jellyfin reports Played=false, but the count stays.
    quietly(
        c["home"],
        "bob",
        "Heat",
        Played=False,
        PlayCount=3,
        PlaybackPositionTicks=5 * MIN,
        LastPlayedDate=iso(),
    )
    report = reconcile(c)
    assert (
        not c["home"].ud("alice", "Arrival")["Played"]
        and not c["public"].ud("alice", "Arrival")["Played"]
    )
    assert c["public"].ud("bob", "Heat")["Played"] and c["parents"].ud("bob", "Heat")["Played"], (
        "re-watch ≠ unplayed"
    )
    assert report["users"]["alice"]["home"]["count"] >= 1


def test_a_like_no_webhook_brought_wins_the_next_pass_where_the_item_is_known_elsewhere(cluster):
    c = cluster()
    home, parents, public = c["home"], c["parents"], c["public"]
    home.user_marks("alice", "Heat", True)  # the item is known: played everywhere, by webhook
    eventually(
        lambda: parents.ud("alice", "Heat")["Played"] and public.ud("Alice", "Heat")["Played"]
    )
    c.settle()
    quietly(home, "alice", "Heat", Likes=True, Rating=10.0, IsFavorite=True)  # its webhook was lost
    reconcile(c)
    for fake, name in ((home, "alice"), (parents, "alice"), (public, "Alice")):
        ud = fake.ud(name, "Heat")
        liked = (
            ud.get("Likes") is True or (ud.get("Rating") or 0) >= jds.LIKE_RATING
        )  # the DTO's Likes
        assert liked and ud["IsFavorite"] is True, (fake.name, ud)


def test_conflicting_changes_are_resolved_by_time(cluster):
    c = cluster()
    for f in c.fakes:
        quietly(
            f,
            "alice",
            "Heat",
            PlaybackPositionTicks=5 * MIN,
            LastPlayedDate=iso(time.time() - 7200),
        )
    assert reconcile(c)["changes"] == 0  # the baseline: 5 minutes in, everywhere
    quietly(
        c["home"],
        "alice",
        "Heat",
        PlaybackPositionTicks=50 * MIN,
        LastPlayedDate=iso(time.time() - 3600),
    )
    quietly(
        c["parents"],
        "alice",
        "Heat",
        PlaybackPositionTicks=20 * MIN,
        LastPlayedDate=iso(time.time() - 60),
    )
    reconcile(c)
    for f in c.fakes:
        assert f.ud("alice", "Heat")["PlaybackPositionTicks"] == 20 * MIN, (
            f.name
        )  # newest, not furthest


def test_dry_run_reports_and_changes_nothing(cluster):
    c = cluster()
    quietly(c["home"], "alice", "Dune", Played=True, PlayCount=1, LastPlayedDate=iso())
    quietly(c["public"], "bob", "Arrival", IsFavorite=True)
    before = snapshot(c)
    report = reconcile(c, dry_run=True)
    assert report["dry_run"] and report["changes"] == 4
    assert report["users"]["alice"]["parents"]["count"] == 1
    assert any("Dune" in line for line in report["users"]["alice"]["public"]["sample"])
    assert snapshot(c) == before, "a dry run must not write anything"
    assert c.svc.call("GET", "/api/queue")[1]["pending_events"] == 0
    res = run_cli("--config", str(c.config_path), "--reconcile", "--dry-run")
    assert res.returncode == 0 and "4 would change" in res.stdout and snapshot(c) == before


def test_reconciliation_catches_up_after_the_service_was_down(cluster):
    c = cluster()
    c["home"].user_marks("alice", "Heat", True)
    c.settle()
    reconcile(c)
    c.svc.stop()  # the service is down; changes happen on two servers, their webhooks are lost
    for f in c.fakes:
        f.webhook_url = None
    c["home"].user_favourites("bob", "Arrival", True)
    c["parents"].user_marks("alice", "Heat", False)
    c["parents"].user_rates("alice", "Dune", True)
    c.start()
    reconcile(c)
    for f in c.fakes:
        assert f.ud("bob", "Arrival")["IsFavorite"], f.name
        assert not f.ud("alice", "Heat")["Played"], f.name
        assert f.ud("alice", "Dune")["Rating"] == 10.0, f.name
    res = run_cli("--config", str(c.config_path), "--reconcile")
    assert res.returncode == 0 and "0 changed" in res.stdout


def test_a_catch_up_writes_from_the_state_it_read_over_a_few_parallel_connections(cluster):
    c = cluster(write_connections=3)
    home, parents = c["home"], c["parents"]
    for i in range(30):
        home.add_item(f"Extra {i}", "Movie", f"/media/extra/{i}.mkv")
        parents.add_item(f"Extra {i}", "Movie", f"/media/extra/{i}.mkv")
        c["public"].add_item(f"Extra {i}", "Movie", f"/media/extra/{i}.mkv")
    for name in ("home", "parents", "public"):
        c.svc.service.library.refresh_index(name)
    when = iso(time.time() - 3600)
    for i in range(30):  # watched on home while the service was down: no webhooks
        quietly(home, "alice", f"Extra {i}", Played=True, PlayCount=2, LastPlayedDate=when)
    parents.delay = 0.02  # a NAS that takes a moment per request
    before = len(parents.requests)
    reconcile(c)
    for i in range(30):
        ud = parents.ud("alice", f"Extra {i}")
        assert ud["Played"] and ud["PlayCount"] == 2 and ud["LastPlayedDate"] == when, (i, ud)
    calls = parents.requests[before:]
    assert not [p for m, p in calls if m == "GET" and p.endswith("/UserData")], (
        "no re-read before each write"
    )
    writes = [p for m, p in calls if m == "POST" and WRITE_ROUTES.search(p)]
    assert len(writes) == 30, len(writes)
    assert 2 <= parents.max_in_flight <= 3, parents.max_in_flight


def test_playlists_are_mirrored_extended_and_trimmed_both_ways(cluster):
    c = cluster(versions=("10.11.8", "12.0.0", "10.10.7"))
    home, parents, public = c["home"], c["parents"], c["public"]
    home.add_playlist("alice", "Sunday", ["Arrival", "Dune"])
    parents.add_playlist(
        "alice", "sunday", ["Heat"]
    )  # the same playlist (names compare without case)
    public.add_playlist("bob", "Someone else's", ["Heat"], public=True)  # public, not alice's
    reconcile(c)
    for f in (home, parents, public):
        assert sorted(f.playlist("alice", "Sunday")) == ["Arrival", "Dune", "Heat"], f.name
    created = next(p for p in public.playlists.values() if p["owner"] == public.user("alice"))
    assert created["OpenAccess"] is False, "created private"
    assert home.playlist("alice", "Someone else's") is None, (
        "only a person's own playlists are copied"
    )
    written = {
        (e["target"], e["old"], e["new"])
        for e in journal(c, field="playlist", cause="pass:1", username="alice")
    }
    assert written == {
        ("public", "none", "created with 3 items"),
        ("home", "2 items", "1 change(s)"),
        ("parents", "1 item", "2 change(s)"),
    }, "every write is in the journal"
    # Later: parents adds an item, home removes one.
    pid = next(p["Id"] for p in parents.playlists.values() if p["Name"] == "sunday")
    home_pl = next(p for p in home.playlists.values() if p["Name"] == "Sunday")
    home_pl["entries"] = [(e, i) for e, i in home_pl["entries"] if home.items[i]["Name"] != "Dune"]
    home.add_item("Alien", "Movie", "/media/movies/Alien.mkv")
    parents.add_item("Alien", "Movie", "/media/movies/Alien.mkv")
    public.add_item("Alien", "Movie", "/media/movies/Alien.mkv")
    parents.playlists[pid]["entries"].append((hexid(), parents.item("Alien")))
    for name in ("home", "parents", "public"):
        c.svc.service.library.refresh_index(name)
    report = reconcile(c)
    assert sorted(home.playlist("alice", "Sunday")) == ["Alien", "Arrival", "Heat"]
    assert sorted(parents.playlist("alice", "Sunday")) == ["Alien", "Arrival", "Heat"]
    # 10.10 cannot remove entries with an API key: the addition lands, the removal is reported.
    assert sorted(public.playlist("alice", "Sunday")) == ["Alien", "Arrival", "Dune", "Heat"]
    assert any("10.11" in e for e in report["errors"])


def owned_playlist(fake: FakeJellyfin, user: str, name: str) -> dict | None:
    uid = fake.user(user)
    return next(
        (p for p in fake.playlists.values() if p["owner"] == uid and p["Name"] == name), None
    )


def test_a_private_playlist_of_a_non_admin_is_mirrored_private_to_the_same_person(cluster):
    # Real servers from 10.10 on answer GET /Playlists/{id} with 400 for an API key: ownership
    # comes from CanDelete (10.9–10.11 in the list; 12.0 per item), never from that call.
    c = cluster(versions=("10.11.8", "10.10.7", "12.0.0"))
    home, parents, public = c["home"], c["parents"], c["public"]
    home.add_playlist("alice", "Road trip", ["Arrival", "Heat"])
    home.add_playlist("bob", "Bob's open list", ["Dune"], public=True)
    home.add_playlist("bob", "For Alice", ["Heat"], shared_with=("alice",))
    report = reconcile(c)
    assert report["errors"] == [], report["errors"]
    for f in (parents, public):
        copy_ = owned_playlist(f, "alice", "Road trip")
        assert copy_ is not None, f.name
        assert copy_["OpenAccess"] is False and copy_["shares"] == [], "created private"
        assert [f.items[i]["Name"] for _, i in copy_["entries"]] == ["Arrival", "Heat"], f.name
        assert (
            owned_playlist(f, "alice", "For Alice") is None
            and owned_playlist(f, "alice", "Bob's open list") is None
        )
        assert owned_playlist(f, "bob", "Bob's open list") is not None, "bob's own list is bob's"
    assert home.playlist("alice", "Road trip") == ["Arrival", "Heat"]


def test_an_administrators_playlists_are_told_apart_where_possible_and_reported_where_not(cluster):
    c = cluster(versions=("10.11.8", "12.0.0"))
    home, parents = c["home"], c["parents"]
    for f in (home, parents):
        f.add_user("root", admin=True)
        f.add_user("chief", admin=True)
    home.add_playlist("root", "Root's own", ["Arrival"])
    home.add_playlist(
        "alice", "Alice's open list", ["Dune"], public=True
    )  # root sees it; alice owns it
    home.add_playlist("root", "Everyone's", ["Heat"], public=True)  # root and chief see it: whose?
    report = reconcile(c)
    assert owned_playlist(parents, "root", "Root's own") is not None
    assert owned_playlist(parents, "root", "Alice's open list") is None
    assert owned_playlist(parents, "alice", "Alice's open list") is not None
    assert (
        owned_playlist(parents, "root", "Everyone's") is None
        and owned_playlist(parents, "chief", "Everyone's") is None
    )
    assert any("Everyone's" in e and "cannot tell" in e for e in report["errors"]), report["errors"]


def test_a_playlist_error_never_drops_the_persons_watch_state_catch_up(cluster):
    c = cluster(versions=("10.11.8", "12.0.0", "10.10.7"))
    home, parents = c["home"], c["parents"]
    home.add_playlist("alice", "Broken", ["Arrival"])
    quietly(home, "alice", "Dune", Played=True, PlayCount=1, LastPlayedDate=iso())
    quietly(parents, "alice", "Heat", IsFavorite=True)
    real = parents._playlist_route

    def broken(method, seg, q, body):
        if method == "POST" and seg == ["Playlists"]:
            return 500, None  # this server cannot create playlists today
        return real(method, seg, q, body)

    parents._playlist_route = broken
    report = reconcile(c)
    assert any("Broken" in e and "parents" in e for e in report["errors"]), report["errors"]
    c.settle()
    for f in c.fakes:
        assert f.ud("alice", "Dune")["Played"] and f.ud("alice", "Heat")["IsFavorite"], f.name
    assert owned_playlist(c["public"], "alice", "Broken") is not None, (
        "the other servers still get it"
    )
    # Reading a server's playlists fails: that person's playlists wait, their watch state does not.
    parents._playlist_route = real
    real_route = home._route

    def no_playlists(method, path, q, body):  # home answers 500 to its playlist list
        return (
            (500, None)
            if q.get("includeitemtypes") == "Playlist"
            else real_route(method, path, q, body)
        )

    home._route = no_playlists
    quietly(parents, "alice", "Arrival", Played=True, PlayCount=1, LastPlayedDate=iso())
    report = reconcile(c)
    home._route = real_route
    assert any("playlists" in e for e in report["errors"]), report["errors"]
    c.settle()
    assert home.ud("alice", "Arrival")["Played"]


# ── Safety net: journal, undo, brake, alerts, export/import ──────────────────


def journal(c: Cluster, **query) -> list[dict]:
    status, body = c.svc.call(
        "GET", "/api/journal?" + urllib.parse.urlencode({"limit": 500, **query})
    )
    assert status == 200, body
    return body["entries"]


def test_the_journal_keeps_every_write_with_its_values_before_and_after_and_why(cluster):
    c = cluster()
    home, parents = c["home"], c["parents"]
    quietly(parents, "alice", "Heat", PlaybackPositionTicks=20 * MIN)  # half-way there
    started = iso()
    home.user_marks("alice", "Heat", True)  # a webhook
    eventually(lambda: parents.ud("alice", "Heat")["Played"], what="played on parents")
    c.settle()
    entries = journal(c, username="alice", target="parents", field="played")
    assert len(entries) == 1, entries
    e = entries[0]
    assert e["source"] == "home" and e["target"] == "parents" and e["user_key"] == "alice"
    assert e["target_item_id"] == parents.item("Heat")
    # Marking played reset the position too: the journal says so, so an undo can put it back.
    assert e["before"] == {"played": False, "position": 20 * MIN} and e["after"] == {
        "played": True,
        "position": 0,
    }
    assert e["cause"].startswith("event:")
    # A pass's writes say which pass.
    quietly(home, "bob", "Dune", IsFavorite=True)
    report = reconcile(c)
    passed = journal(c, cause=f"pass:{report['pass']}")
    assert {(x["target"], x["field"]) for x in passed} == {
        ("parents", "favorite"),
        ("public", "favorite"),
    }
    assert all(
        x["before"] == {"favorite": False} and x["after"] == {"favorite": True} for x in passed
    )
    # Searchable: person, item, server, field, time range.
    assert len(journal(c, username="bob", item_name="dun", server="public")) == 1
    assert len(journal(c, since=started)) == 4
    assert journal(c, until="2000-01-01T00:00") == []
    assert c.svc.call("GET", "/api/journal?since=yesterday")[0] == 400


def undo(c: Cluster, dry_run: bool = True, **scope) -> tuple[int, dict]:
    return c.svc.call(
        "POST", "/api/undo", {**scope, "dry_run": dry_run}, {"Content-Type": "application/json"}
    )


def test_undo_one_change_previews_then_writes_the_value_back_there_only(cluster):
    c = cluster()
    home, parents, public = c["home"], c["parents"], c["public"]
    home.user_marks("alice", "Arrival", True)
    eventually(
        lambda: parents.ud("alice", "Arrival")["Played"] and public.ud("alice", "Arrival")["Played"]
    )
    c.settle()
    entry = journal(c, target="parents", field="played")[0]
    status, preview = undo(c, id=entry["id"])
    assert status == 200 and preview["dry_run"] and preview["changes"] == 1, preview
    assert preview["servers"]["parents"]["undo"] == 1
    assert "Arrival" in preview["servers"]["parents"]["sample"][0]
    assert parents.ud("alice", "Arrival")["Played"], "a preview changes nothing"
    status, done = undo(c, dry_run=False, id=entry["id"])
    assert status == 202 and done["undo"].startswith("undo:"), done
    eventually(lambda: not parents.ud("alice", "Arrival")["Played"], what="the undo on parents")
    c.settle()
    assert public.ud("alice", "Arrival")["Played"] and home.ud("alice", "Arrival")["Played"], (
        "only that change"
    )
    back = journal(c, cause=done["undo"])
    assert len(back) == 1 and back[0]["after"] == {"played": False}
    # Undoing it again finds it already as it was.
    assert undo(c, id=entry["id"])[1]["servers"]["parents"]["already"] == 1
    assert undo(c)[0] == 400, "an undo must say what it covers"


def test_undo_a_pass_and_a_time_window_never_clobbers_a_newer_change(cluster):
    c = cluster(retry_base_seconds=1.0)  # a refused write is tried again a second later
    home, parents, public = c["home"], c["parents"], c["public"]
    quietly(home, "alice", "Dune", IsFavorite=True)
    quietly(home, "alice", "Heat", Rating=10.0)
    report = reconcile(c)
    assert (
        parents.ud("alice", "Heat")["Rating"] == 10.0 and public.ud("alice", "Dune")["IsFavorite"]
    )
    quietly(public, "alice", "Heat", Rating=1.0)  # the person changed their mind there since
    status, preview = undo(c, cause=f"pass:{report['pass']}")
    assert preview["servers"]["parents"]["undo"] == 2, preview
    assert preview["servers"]["public"] == {
        **preview["servers"]["public"],
        "undo": 1,
        "changed_since": 1,
    }
    assert "changed since" in preview["servers"]["public"]["refused"][0]
    # The writer checks once more: parents takes no writes when the undo is queued, and the
    # person dislikes Heat there before it does; that change is kept, Dune's undone.
    parents.writes_fail = True
    undo(c, dry_run=False, cause=f"pass:{report['pass']}")
    eventually(lambda: parents.writes_refused, what="a refused write on parents")
    quietly(parents, "alice", "Heat", Rating=3.0)
    parents.writes_fail = False
    eventually(lambda: not parents.ud("alice", "Dune")["IsFavorite"], what="Dune undone on parents")
    refused = eventually(
        lambda: [
            j
            for j in c.svc.call("GET", "/api/events/failed")[1]
            if j["target_server"] == "parents" and "not undone" in (j["last_error"] or "")
        ],
        what="Heat's undo refused",
    )
    assert "now holds disliked" in refused[0]["last_error"], refused
    assert parents.ud("alice", "Heat")["Rating"] == 3.0, "the newer dislike is kept"
    eventually(lambda: not public.ud("alice", "Dune")["IsFavorite"])
    c.settle()
    assert public.ud("alice", "Heat")["Rating"] == 1.0, "a newer change wins, never clobbered"
    # A person, a server and a time window.
    since = iso()
    c["parents"].user_marks("bob", "Arrival", True)
    c["parents"].user_favourites("bob", "Heat", True)
    eventually(lambda: home.ud("bob", "Heat")["IsFavorite"] and home.ud("bob", "Arrival")["Played"])
    c.settle()
    status, preview = undo(c, user="Bob", server="home", since=since)
    assert preview["changes"] == 2 and list(preview["servers"]) == ["home"], preview
    undo(c, dry_run=False, user="bob", server="home", since=since)
    eventually(
        lambda: not home.ud("bob", "Heat")["IsFavorite"] and not home.ud("bob", "Arrival")["Played"]
    )
    c.settle()
    assert public.ud("bob", "Arrival")["Played"], "only home's writes were in the scope"


def films_played_everywhere(c: Cluster, user: str, names: list[str]) -> None:
    for f in c.fakes:
        for name in names:
            quietly(
                f, user, name, Played=True, PlayCount=1, LastPlayedDate=iso(time.time() - 86400)
            )


def start_in_step(c: Cluster, films: int, played: int | None = None) -> list[str]:
    """A library of ``films`` on every server, the first ``played`` of them (all, by default)
    played by alice everywhere; the service started, and a first pass that finds them in step.
    Returns the played films' names."""
    for f in c.fakes:
        f.add_library(films)
    names = [f"Film {i}" for i in range(films if played is None else played)]
    films_played_everywhere(c, "alice", names)
    c.start()
    assert reconcile(c)["changes"] == 0  # the baseline: everyone agrees
    return names


def held(c: Cluster) -> list[dict]:
    status, body = c.svc.call("GET", "/api/held")
    assert status == 200, body
    return body["held"]


def test_the_brake_holds_a_burst_of_unplayed_from_one_server_and_lets_played_through(cluster):
    c = cluster(start=False, extra={"safety": {"brake_items": 50}})
    gone, new = start_in_step(c, 600, played=300), [f"Film {i}" for i in range(300, 600)]
    home, parents, public = c["home"], c["parents"], c["public"]
    for a, b in zip(gone, new, strict=True):  # a client marks 300 unplayed and 300 played, at once
        home.user_marks("alice", a, False)
        home.user_marks("alice", b, True)
    eventually(
        lambda: all(
            parents.ud("alice", n)["Played"] and public.ud("alice", n)["Played"] for n in new
        ),
        30,
        what="the 300 played on the others: adding state is never held",
    )
    c.settle(30)
    groups = held(c)
    assert len(groups) == 1, groups
    g = groups[0]
    assert g["source"] == "home" and g["user"] == "alice" and g["targets"] == ["parents", "public"]
    assert g["changes"] >= 250 and g["kinds"] == {"unplayed": g["changes"]}, g
    assert (
        g["summary"]
        == f"held: {g['changes']:,} changes from home for alice: {g['changes']:,} unplayed"
    )
    assert len(g["sample"]) == 8 and g["sample"][0].startswith("unplayed: Film")
    for target in (
        parents,
        public,
    ):  # what went before the brake engaged: at most its limit and a few in flight
        assert sum(target.ud("alice", n)["Played"] for n in gone) >= 250
    # Discard: the held changes go nowhere; what slipped through before the brake engaged is put
    # back, and home gets back what the others held.
    status, out = c.svc.call(
        "POST",
        "/api/held/discard",
        {"source": "home", "user": "alice"},
        {"Content-Type": "application/json"},
    )
    assert status == 200 and out["discarded"] == g["changes"] and out["restored"] >= g["changes"], (
        out
    )
    # noqa: E731
    everywhere = lambda: all(f.ud("alice", n)["Played"] for f in c.fakes for n in gone)
    eventually(everywhere, 30, what="every server back to played")
    c.settle(30)
    assert held(c) == [] and everywhere()
    assert all(f.ud("alice", n)["Played"] for f in c.fakes for n in new), "the played ones stay"
    assert reconcile(c)["changes"] == 0, "the next pass finds everyone in step and proposes nothing"


def test_held_changes_go_when_applied_and_passes_obey_the_brake(cluster):
    c = cluster(start=False, extra={"safety": {"brake_items": 20}})
    for f in c.fakes:
        f.add_library(40)
    names = [f"Film {i}" for i in range(40)]
    for f in c.fakes:
        for n in names:
            quietly(f, "bob", n, IsFavorite=True)
    c.start()
    assert reconcile(c)["changes"] == 0
    for n in names:  # unfavourited on parents while the service was down: no webhooks
        quietly(c["parents"], "bob", n, IsFavorite=False)
    report = reconcile(c)
    assert report["changes"] == 80  # decided for both others, then held
    g = held(c)[0]
    assert (g["source"], g["changes"], g["jobs"]) == ("parents", 40, 80), g
    assert g["summary"] == "held: 40 changes from parents for bob: 40 unfavourited"
    assert all(c["home"].ud("bob", n)["IsFavorite"] for n in names), "a pass obeys the brake"
    status, out = c.svc.call(
        "POST",
        "/api/held/apply",
        {"source": "parents", "user": "bob"},
        {"Content-Type": "application/json"},
    )
    assert status == 200 and out["applied"] == 80
    eventually(
        lambda: not any(c[s].ud("bob", n)["IsFavorite"] for s in ("home", "public") for n in names),
        20,
    )
    assert held(c) == []
    assert (
        c.svc.call(
            "POST",
            "/api/held/apply",
            {"source": "nowhere", "user": "bob"},
            {"Content-Type": "application/json"},
        )[0]
        == 400
    )


class Receiver:
    """A local test receiver for alerts and pings: records every POST (path, query, body)."""

    def __init__(self):
        self.got: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                parts = urllib.parse.urlsplit(self.path)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode()
                receiver.got.append({"path": parts.path, "query": parts.query, "body": body})
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def bodies(self, path: str) -> list:
        return [g["body"] for g in self.got if g["path"] == path]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_each_alert_format_posts_what_that_service_reads(cluster, receiver):
    r = receiver.url.replace("http://", "")
    urls = [
        f"http://{r}/plain",
        f"ntfy+http://{r}/jds-alerts",
        f"gotify+http://{r}/message?token=AbCdEf123",
        f"discord+http://{r}/api/webhooks/1/secret",
        f"slack+http://{r}/services/T0/B0/secret",
        "tgram://bottoken/chatid",  # Apprise's, which this machine has not installed
    ]
    c = cluster(extra={"alerts": {"urls": urls}})
    status, out = c.svc.call("POST", "/api/alerts/test")
    assert status == 502 and [x["ok"] for x in out["results"]] == [True] * 5 + [False], out
    assert "pip install apprise" in out["results"][5]["error"] and "bottoken" not in json.dumps(out)
    assert all("secret" not in x["to"] and "AbCdEf" not in x["to"] for x in out["results"]), (
        "no secrets shown"
    )
    plain = receiver.bodies("/plain")[0]
    assert (
        plain["service"] == "jellyfin-db-sync"
        and plain["title"] == "test alert"
        and plain["level"] == "test"
    )
    assert plain["condition"] == "test" and plain["message"] and parse_iso(plain["at"])
    ntfy = receiver.bodies("/")[
        0
    ]  # ntfy's JSON publishing: the server's root, the topic in the body
    assert ntfy["topic"] == "jds-alerts" and ntfy["title"] == "test alert" and ntfy["message"]
    gotify = next(g for g in receiver.got if g["path"] == "/message")
    assert gotify["query"] == "token=AbCdEf123" and set(gotify["body"]) == {
        "title",
        "message",
        "priority",
    }
    assert receiver.bodies("/api/webhooks/1/secret")[0]["content"].startswith("**test alert**\n")
    assert receiver.bodies("/services/T0/B0/secret")[0]["text"].startswith("*test alert*\n")
    # The formats are also told from the address alone.
    assert jds.alert_format("https://discord.com/api/webhooks/1/x")[0] == "discord"
    assert jds.alert_format("https://hooks.slack.com/services/x")[0] == "slack"
    assert jds.alert_format("https://ntfy.sh/topic")[0] == "ntfy"
    assert jds.alert_format("https://push.example/message?token=x")[0] == "gotify"
    assert jds.alert_format("tgram://bot/chat")[0] == "apprise"
    status, shown = c.svc.call("GET", "/api/alerts")
    assert "AbCdEf" not in json.dumps(shown) and "secret" not in json.dumps(shown)
    assert [d["format"] for d in shown["destinations"]] == [
        "json",
        "ntfy",
        "gotify",
        "discord",
        "slack",
        "apprise",
    ]


def test_an_alert_url_that_cannot_be_requested_is_refused_without_showing_its_token(
    tmp_path, fake_servers
):
    import yaml

    cfg = write_config(tmp_path, fake_servers("home", "parents"))
    data = yaml.safe_load(cfg.read_text())
    data["alerts"] = {"urls": ["https://ntfy.example.com/my topic?auth=tk_SECRET0123456789"]}
    cfg.write_text(yaml.safe_dump(data))
    res = run_cli("--check-config", "--config", str(cfg))
    said = res.stdout + res.stderr
    assert res.returncode == 2 and "alerts.urls[0]" in said and "%20" in said, said
    assert "SECRET" not in said and "Traceback" not in said, said
    env = {"JDS_HEALTHCHECKS_URL": "https://hc-ping.com/uuid\n?x=SECRET0123456789"}
    res = run_cli("--check-config", "--config", str(cfg), env=env)
    assert res.returncode != 0 and "SECRET" not in res.stdout + res.stderr
    assert (
        jds.without_url(
            "URL can't contain control characters. '/my topic?auth=tk_SECRET0123456789' (found at "
            "least ' ')",
            "https://ntfy.example.com/my topic?auth=tk_SECRET0123456789",
        ).count("SECRET")
        == 0
    )


def counting_alert_checks(c: Cluster, monkeypatch) -> list[int]:
    """[how many times the service has looked at the alert conditions since], counted as its
    alert loop calls check(): proof that rounds went by, where a sleep would only hope so."""
    alerts, checks = c.svc.service.safety.alerts, [0]
    check = alerts.check

    def counted():
        check()
        checks[0] += 1

    monkeypatch.setattr(alerts, "check", counted)
    return checks


def test_one_alert_per_condition_until_it_clears_and_pings_around_each_pass(
    cluster, receiver, monkeypatch
):
    monkeypatch.setattr(jds, "ALERT_CHECK_SECONDS", 0.1)
    alerts = {
        "urls": [f"{receiver.url}/hook"],
        "healthchecks_url": f"{receiver.url}/ping",
        "unreachable_minutes": 0,
    }
    c = cluster(extra={"alerts": alerts})
    c["parents"].status_override = 503  # down
    checks = counting_alert_checks(c, monkeypatch)
    c.svc.service.syncer.check_server("parents")
    eventually(lambda: receiver.bodies("/hook"), what="an alert")
    done = checks[0]
    eventually(lambda: checks[0] >= done + 10, what="ten more alert checks")  # still one alert
    sent = receiver.bodies("/hook")
    assert (
        len(sent) == 1
        and sent[0]["condition"] == "unreachable:parents"
        and sent[0]["level"] == "problem"
    ), sent
    assert "parents has been unreachable" in sent[0]["message"]
    c["parents"].status_override = None
    c.svc.service.syncer.check_server("parents")
    eventually(lambda: len(receiver.bodies("/hook")) == 2, what="the all-clear")
    assert receiver.bodies("/hook")[1]["level"] == "resolved"
    done = checks[0]
    eventually(lambda: checks[0] >= done + 5, what="five more alert checks")
    assert len(receiver.bodies("/hook")) == 2
    reconcile(c)
    assert [g["path"] for g in receiver.got if g["path"].startswith("/ping")] == [
        "/ping/start",
        "/ping",
    ]
    assert "changes queued" in receiver.bodies("/ping")[0]


def test_a_server_restored_to_everything_unplayed_spreads_nothing(cluster, receiver, monkeypatch):
    """As a user meets it: home comes back from an old backup with nothing played."""
    monkeypatch.setattr(jds, "ALERT_CHECK_SECONDS", 0.1)
    c = cluster(start=False, extra={"alerts": {"urls": [f"{receiver.url}/hook"]}})
    names = start_in_step(c, 150)
    for n in names:  # the restore: no webhooks, everything unplayed
        quietly(c["home"], "alice", n, Played=False, PlayCount=0, LastPlayedDate=None)
    reconcile(c)
    assert all(c[s].ud("alice", n)["Played"] for s in ("parents", "public") for n in names), (
        "nothing spreads"
    )
    status, dash = c.svc.call("GET", "/api/dashboard")
    assert dash["held"][0]["summary"] == "held: 150 changes from home for alice: 150 unplayed"
    assert dash["status"]["queue"]["held_events"] == 300  # 150 items, for each of two servers
    alert = eventually(lambda: receiver.bodies("/hook"), what="an alert")[0]
    assert (
        alert["condition"] == "held:home:alice"
        and "150 changes from home for alice" in alert["message"]
    )
    status, out = c.svc.call(
        "POST",
        "/api/held/discard",
        {"source": "home", "user": "alice"},
        {"Content-Type": "application/json"},
    )
    assert out == {"discarded": 150, "restored": 150, "undone": 0, "errors": []}
    eventually(
        lambda: all(c["home"].ud("alice", n)["Played"] for n in names), 30, what="home repaired"
    )
    c.settle()
    assert c.svc.call("GET", "/api/dashboard")[1]["held"] == []
    eventually(
        lambda: [b for b in receiver.bodies("/hook") if b["level"] == "resolved"],
        what="the all-clear",
    )
    assert reconcile(c)["changes"] == 0


def said_by(*args: str) -> tuple[int, str]:
    """The command line in a process of its own, as a user runs it: (exit code, what it said)."""
    out = run_cli(*args, timeout=120)
    return out.returncode, out.stdout + out.stderr


def test_export_then_import_onto_an_empty_server_reproduces_every_field(cluster):
    c = cluster(start=False)
    home, public = c["home"], c["public"]
    hs = home.add_item("Lost", "Series", "/data/tv/Lost", provider_ids={"Tvdb": "73739"})
    home.add_item("Pilot", "Episode", "/data/tv/Lost/1x01.mkv", series_id=hs, season=1, episode=1)
    ps = public.add_item("LOST (2004)", "Series", "/mnt/shows/LOST", provider_ids={"Tvdb": "73739"})
    public.add_item(
        "Pilot (1)", "Episode", "/mnt/shows/LOST/S01E01.mkv", series_id=ps, season=1, episode=1
    )
    when = iso(time.time() - 3 * 86400)
    quietly(home, "alice", "Arrival", Played=True, PlayCount=3, LastPlayedDate=when)
    quietly(
        home, "alice", "Dune", PlaybackPositionTicks=30 * MIN, IsFavorite=True, LastPlayedDate=when
    )
    quietly(home, "alice", "Heat", Rating=1.0)  # disliked
    quietly(home, "alice", "Pilot", Played=True, PlayCount=1, LastPlayedDate=when, Rating=10.0)
    out = c.tmp / "history.json"
    victim = c.tmp / "someone-elses.txt"
    victim.write_text("untouched")
    (c.tmp / "history.json.tmp").symlink_to(victim)  # planted where the export once wrote first
    assert run_cli("--config", str(c.config_path), "--export", str(out)).returncode == 0
    assert victim.read_text() == "untouched" and out.stat().st_mode & 0o777 == 0o600
    data = json.loads(out.read_text())
    assert data["format"] == jds.EXPORT_FORMAT and data["version"] == 1
    items = {e["name"]: e for e in data["people"]["alice"]["home"]}
    assert (
        set(items) == {"Arrival", "Dune", "Heat", "Pilot"}
        and data["people"]["alice"]["public"] == []
    )
    arrival = items["Arrival"]
    assert arrival["year"] == 2016 and arrival["ids"] == {"imdb": "tt2543164", "tmdb": "329865"}
    assert arrival["path"] == "/media/movies/arrival (2016)/arrival.mkv"
    assert (arrival["played"], arrival["play_count"], arrival["last_played"]) == (True, 3, when)
    assert items["Pilot"]["series"] == {"name": "Lost", "ids": {"tvdb": "73739"}}
    assert (items["Pilot"]["season"], items["Pilot"]["episode"]) == (1, 1)
    assert items["Heat"]["likes"] is False and items["Dune"]["position"] == 30 * MIN
    before = snapshot(c)
    args = [
        "--config",
        str(c.config_path),
        "--import",
        str(out),
        "--to",
        "public",
        "--user",
        "alice",
    ]
    code, said = said_by(*args, "--dry-run")
    assert code == 0 and "alice: 4 items found on public, 0 not; would change:" in said, said
    assert snapshot(c) == before, "a dry run changes nothing"
    code, said = said_by(*args)
    assert code == 0 and "changes written (import:1)" in said, said
    pairs = [("Arrival", "Arrival"), ("Dune", "Dune"), ("Heat", "Heat"), ("Pilot", "Pilot (1)")]
    for mine, theirs in pairs:
        a, b = home.ud("alice", mine), public.ud("alice", theirs)
        assert jds.read_fields(a) == jds.read_fields(b), (mine, a, b)
        assert (a["PlayCount"], a["LastPlayedDate"]) == (b["PlayCount"], b["LastPlayedDate"]), (
            mine,
            a,
            b,
        )
    assert public.ud("bob", "Arrival") == home.ud("bob", "Arrival"), "only --user's history"
    store = jds.Store(c.config.database_path)
    entries, _ = store.sync_log(50, 0, cause="import:1")
    store.close()
    assert len(entries) >= 5 and all(e.before is not None for e in entries), (
        "in the journal, undoable"
    )
    # A file that is not an export is refused, naming what it expects.
    bad = c.tmp / "bad.json"
    bad.write_text('{"people": {}}')
    code, said = said_by("--config", str(c.config_path), "--import", str(bad), "--to", "public")
    assert code == 1 and "not an export of this program" in said, said


def test_an_import_that_would_unmark_many_items_is_held_by_the_brake(cluster):
    c = cluster(start=False, extra={"safety": {"brake_items": 5}})
    public = c["public"]
    public.add_library(10)
    names = [f"Film {i}" for i in range(10)]
    for n in names:
        quietly(public, "bob", n, Played=True, PlayCount=1, LastPlayedDate=iso(time.time() - 86400))
    # A file written by hand, in the README's format: unplayed, but favourites.
    entries = [
        {
            "name": n,
            "type": "Movie",
            "path": f"/media/movies/film {i}/film.mkv",
            "played": False,
            "favorite": True,
        }
        for i, n in enumerate(names)
    ]
    data = {"format": jds.EXPORT_FORMAT, "version": 1, "people": {"bob": {"old-box": entries}}}
    path = c.tmp / "by-hand.json"
    path.write_text(json.dumps(data))
    code, said = said_by("--config", str(c.config_path), "--import", str(path), "--to", "public")
    assert code == 0 and "10 items found on public" in said and "10 held by the brake" in said, said
    assert all(public.ud("bob", n)["IsFavorite"] for n in names), "adding state is never held"
    assert all(public.ud("bob", n)["Played"] for n in names), (
        "the unplayed wait for a person's decision"
    )


def test_an_import_file_of_garbage_is_refused_and_names_are_printed_harmless(cluster):
    c = cluster(start=False)
    deep = c.tmp / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    code, said = said_by(
        "--config", str(c.config_path), "--import", str(deep), "--to", "public", "--dry-run"
    )
    assert code == 1 and "nested too deeply" in said and "Traceback" not in said, said
    # A name that would turn the terminal red, and one that would start a line of its own.
    entries = [{"name": "Heat", "type": "Movie", "played": True}]
    people = {"al\x1b[31mice": {"old-box": entries}, "bob\nfake: line": {"old-box": entries}}
    path = c.tmp / "names.json"
    path.write_text(json.dumps({"format": jds.EXPORT_FORMAT, "version": 1, "people": people}))
    code, said = said_by(
        "--config", str(c.config_path), "--import", str(path), "--to", "public", "--dry-run"
    )
    assert (
        code == 0 and "\x1b" not in said and "al\\x1b[31mice" in said and "bob\\nfake: line" in said
    ), said
    assert not any(line.startswith("fake: line") for line in said.splitlines()), said


def test_undo_from_the_command_line_previews_then_applies(cluster):
    c = cluster()
    c["home"].user_favourites("alice", "Heat", True)
    eventually(
        lambda: (
            c["parents"].ud("alice", "Heat")["IsFavorite"]
            and c["public"].ud("alice", "Heat")["IsFavorite"]
        )
    )
    c.settle()
    cause = journal(c, target="parents")[0]["cause"]
    c.svc.stop()
    c.svc = None
    args = ["--config", str(c.config_path), "--undo", "--cause", cause]
    code, said = said_by(*args, "--dry-run")
    assert (
        code == 0
        and "2 to undo" in said
        and "parents: 1 to undo" in said
        and "not favourite" in said
    ), said
    assert c["parents"].ud("alice", "Heat")["IsFavorite"]
    code, said = said_by(*args)
    assert code == 0 and "undone (undo:1)" in said, said
    assert (
        not c["parents"].ud("alice", "Heat")["IsFavorite"]
        and not c["public"].ud("alice", "Heat")["IsFavorite"]
    )
    assert c["home"].ud("alice", "Heat")["IsFavorite"]
    code, said = said_by("--config", str(c.config_path), "--undo")
    assert code == 1 and "say what to undo" in said, said


# ── Webhook endpoint ─────────────────────────────────────────────────────────


def test_webhook_accepts_every_fixture_and_rejects_garbage(cluster):
    c = cluster(start=False)
    c.start()
    svc = c.svc
    for path in sorted(FIXTURES.glob("*.json")) + sorted((FIXTURES / "legacy").glob("*.json")):
        status, body = svc.call("POST", "/webhook/home", path.read_bytes())
        assert status in (200, 202), (path.name, status, body)
    rows = svc.store._rows("SELECT count(*) FROM inbox")[0][0]
    for bad, code in [
        (b"", 400),
        (b"{not json", 400),
        (b"[1,2]", 400),
        (b'{"Name":"x"}', 400),
        (json.dumps({"NotificationType": "UserDataSaved"}).encode(), 400),
        (json.dumps(dict(fixture("UserDataSaved-played.json"), ItemId="zz")).encode(), 400),
        (json.dumps(dict(fixture("UserDataSaved-played.json"), Played="maybe")).encode(), 400),
        (b"\xff\xfe", 400),
    ]:
        status, body = svc.call("POST", "/webhook/home", bad)
        assert status == code and "error" in body, (bad, status, body)
    assert svc.store._rows("SELECT count(*) FROM inbox")[0][0] == rows, (
        "invalid input must write nothing"
    )
    status, body = svc.call("POST", "/webhook/nosuchserver", fixture("UserDataSaved-played.json"))
    assert status == 404 and "unknown server" in body["error"]
    status, body = svc.call("POST", "/webhook/home", b"x" * (jds.MAX_BODY_BYTES + 10))
    assert status == 413
    assert svc.call("GET", "/webhook/test") == (
        200,
        {"status": "ok", "message": "Webhook receiver is running"},
    )
    status, body = svc.call("POST", "/webhook/home", fixture("AuthenticationSuccess.json"))
    assert status == 200 and body["status"] == "ignored"
    # The URL: a name is matched exactly (UTF-8 decoded), anything else is a JSON 4xx.
    played = json.dumps(fixture("UserDataSaved-played.json")).encode()
    status, body = svc.call("POST", "/webhook/%C3%A9t%C3%A9", played)
    assert status == 404 and "'été'" in body["error"]
    assert svc.call("POST", "/webhook/%FF", played)[0] == 400
    status, body = svc.call("POST", "/webhook/home/more", played)
    assert status == 404 and "error" in body
    # A chunked body (no Content-Length) is read whole.
    conn = HTTPConnection("127.0.0.1", svc.port, timeout=10)
    conn.request(
        "POST", "/webhook/home", iter([played[:100], played[100:]])
    )  # http.client chunks it
    resp = conn.getresponse()
    assert resp.status == 202 and json.loads(resp.read())["status"] == "queued"
    conn.close()
    assert svc.store._rows("SELECT count(*) FROM inbox")[0][0] == rows + 1
    # A bug of ours is a logged JSON 500, not a dropped connection; the service carries on.
    syncer = svc.service.syncer
    real, syncer.accept_webhook = syncer.accept_webhook, lambda *a: 1 / 0
    try:
        status, body = svc.call("POST", "/webhook/home", played)
    finally:
        syncer.accept_webhook = real
    assert status == 500 and body["error"].startswith("500")
    assert svc.call("POST", "/webhook/home", played)[0] == 202


def test_dates_and_ids_are_read_strictly():
    # Jellyfin's own format (7 fractional digits, Z), offsets, and a naive time taken as UTC.
    assert jds.parse_time("2026-11-24T07:28:59.1234567Z") == pytest.approx(1795505339.123456)
    assert jds.parse_time("2026-11-24T09:28:59.5+02:00") == jds.parse_time("2026-11-24 07:28:59.5")
    for bad in (
        "2026-02-30T00:00:00Z",
        "yesterday",
        "",
        None,
        1795505339,
        "2026-11-24T07:28:59Z\n",
    ):
        assert jds.parse_time(bad) is None, bad
    body = fixture("UserDataSaved-played.json")
    assert jds.parse_webhook(json.dumps(body).encode())["ItemId"] == body["ItemId"]
    for bad_id in (body["ItemId"] + "\n", body["ItemId"][:-1], 42):
        with pytest.raises(jds.WebhookError, match="ItemId"):
            jds.parse_webhook(json.dumps(dict(body, ItemId=bad_id)).encode())
    for field, bad in (("Played", 1), ("Played", "yes"), ("PlayCount", True), ("PlayCount", 1.5)):
        with pytest.raises(jds.WebhookError, match=field):
            jds.parse_webhook(json.dumps(dict(body, **{field: bad})).encode())


def test_the_servers_no_date_and_numbers_it_cannot_hold_are_met_at_the_door(cluster):
    c = cluster()
    home = c["home"]
    body = home.played_payload(home.user("alice"), home.item("Heat"))
    # DateTime.MinValue with an offset (docs/jellyfin.md §1, dates): no date — taken, and synced.
    assert (
        c.svc.call("POST", "/webhook/home", dict(body, LastPlayedDate="0001-01-01T00:00:00+01:00"))[
            0
        ]
        == 202
    )
    eventually(lambda: c["parents"].ud("alice", "Heat")["Played"], what="the played mark")
    c.settle()
    assert c.svc.call("GET", "/api/events/failed")[1] == []
    # The server's PlayCount is a 32-bit number: anything larger is refused, naming the field.
    status, answer = c.svc.call("POST", "/webhook/home", dict(body, PlayCount=2**63 - 1))
    assert status == 400 and "PlayCount" in json.dumps(answer), answer
    assert c.svc.call("POST", "/webhook/home", dict(body, PlayCount=2**31 - 1))[0] == 202
    for late in ("9999-12-31T23:59:59-14:00", "1969-12-31T23:59:59Z"):
        assert jds.parse_time(late) is None, late


def test_template_bodies_with_dashed_ids_and_true_false_work(cluster):
    c = cluster()
    home, parents = c["home"], c["parents"]
    uid, iid = home.user("bob"), home.item("Dune")
    home.data[(uid, iid)] = {
        "PlaybackPositionTicks": 0,
        "PlayCount": 1,
        "IsFavorite": False,
        "Rating": None,
        "LastPlayedDate": iso(),
        "Played": True,
    }
    body = home.payload("UserDataSaved", uid, iid, home.ud(uid, iid), SaveReason="TogglePlayed")
    body["ItemId"] = str(uuid.UUID(iid))
    body["UserId"] = str(uuid.UUID(uid)).upper()
    body["Played"] = "True"
    body["Favorite"] = "False"
    status, _ = c.svc.call(
        "POST", "/webhook/home", json.dumps(body), {"Content-Type": "application/json"}
    )
    assert status == 202
    eventually(lambda: parents.ud("bob", "Dune")["Played"], what="a template-style body to sync")


def test_the_webhook_plugin_is_set_up_for_the_user(cluster):
    token = "a-token-of-sixteen-chars"
    c = cluster(extra={"server": {"webhook_token": token}}, start=False)
    c.start()
    home, parents, public = c["home"], c["parents"], c["public"]
    for f in c.fakes:
        f.webhook_url = None  # nobody has configured the plugin by hand
    public.plugin_installed = False
    svc = c.svc
    status, answer = svc.call(
        "POST",
        "/api/servers/home/setup-webhook",
        {"public_url": svc.url},
        {"Content-Type": "application/json"},
    )
    assert status == 200 and answer["result"] == "added", answer
    ours = next(
        d for d in home.plugin_config["GenericOptions"] if d["WebhookName"] == "jellyfin-db-sync"
    )
    assert (
        ours["WebhookUri"] == f"{svc.url}/webhook/home"
        and ours["SendAllProperties"]
        and ours["EnableWebhook"]
    )
    assert {"UserDataSaved", "PlaybackStop", "ItemAdded", "UserCreated"} <= set(
        ours["NotificationTypes"]
    )
    assert (
        ours["EnableMovies"]
        and ours["EnableEpisodes"]
        and ours["Headers"] == [{"Key": "X-Webhook-Token", "Value": token}]
    )
    assert {
        "WebhookName": "home-assistant",
        "WebhookUri": "http://ha.local/hook",
        "Headers": [],
    } in home.plugin_config["GenericOptions"], "another destination is left as it was"
    # Idempotent: a second time changes nothing and writes nothing.
    saves = home.plugin_saves
    assert (
        svc.call(
            "POST",
            "/api/servers/home/setup-webhook",
            {"public_url": svc.url},
            {"Content-Type": "application/json"},
        )[1]["result"]
        == "unchanged"
    )
    assert home.plugin_saves == saves and len(home.plugin_config["GenericOptions"]) == 2
    # Not installed: said, with what to do.
    status, answer = svc.call(
        "POST",
        "/api/servers/public/setup-webhook",
        {"public_url": svc.url},
        {"Content-Type": "application/json"},
    )
    assert status == 502 and "not installed" in answer["message"] and "Catalog" in answer["message"]
    # The command line does every server (public still lacks the plugin: exit 1, the others ✓);
    # a destination of ours from before (an old address, switched off) is updated in place.
    old = {
        "WebhookName": "jellyfin-db-sync",
        "WebhookUri": "http://old:8080/webhook/parents",
        "EnableWebhook": False,
    }
    parents.plugin_config["GenericOptions"].append(old)
    res = run_cli("--config", str(c.config_path), "--setup-webhooks", svc.url)
    assert res.returncode == 1 and "✓ parents: Webhook plugin destination updated" in res.stdout, (
        res.stdout
    )
    assert "✗ public" in res.stdout and "✓ home: the Webhook plugin already posts" in res.stdout
    mine = [
        d for d in parents.plugin_config["GenericOptions"] if d["WebhookName"] == "jellyfin-db-sync"
    ]
    assert (
        len(mine) == 1
        and mine[0]["WebhookUri"] == f"{svc.url}/webhook/parents"
        and mine[0]["EnableWebhook"]
    )
    # And now the plugin's own webhooks arrive and sync, with nothing set up by hand.
    home.user_marks("alice", "Heat", True)
    eventually(
        lambda: parents.ud("alice", "Heat")["Played"], what="a sync through the set-up webhook"
    )
    assert next(s for s in svc.call("GET", "/api/servers")[1] if s["name"] == "home")[
        "last_webhook_at"
    ]


def test_refused_webhooks_are_counted_per_server_with_a_hint(cluster):
    svc = cluster().svc
    svc.call(
        "POST",
        "/webhook/home",
        b'{"NotificationType": "UserDataSaved", "Name": {{Name}}, "Played": True}',
    )
    home = next(s for s in svc.call("GET", "/api/servers")[1] if s["name"] == "home")
    refused = home["rejected_webhooks"]
    assert (
        refused["count"] == 1
        and "JSON" in refused["last_reason"]
        and "Send All Properties" in refused["hint"]
    )
    assert (
        next(s for s in svc.call("GET", "/api/servers")[1] if s["name"] == "parents")[
            "rejected_webhooks"
        ]["count"]
        == 0
    )


def test_webhook_token_in_header_bearer_or_query(tmp_path, fake_servers):
    fakes = fake_servers("home", "parents")
    cfg = jds.load_config(write_config(tmp_path, fakes))
    cfg = jds.dataclasses.replace(cfg, webhook_token="s3cret-token")
    svc = Running(cfg)
    try:
        body = fixture("UserDataSaved-played.json")
        rows = lambda: svc.store._rows("SELECT count(*) FROM inbox")[0][0]  # noqa: E731
        for headers, path in [
            ({}, "/webhook/home"),
            ({"X-Webhook-Token": "wrong"}, "/webhook/home"),
            ({"Authorization": "Bearer nope"}, "/webhook/home"),
            ({}, "/webhook/home?token=x"),
        ]:
            status, answer = svc.call("POST", path, body, headers)
            assert status == 401 and "token" in answer["error"], (headers, path)
        assert rows() == 0, "a refused webhook must write nothing"
        for headers, path in [
            ({"X-Webhook-Token": "s3cret-token"}, "/webhook/home"),
            ({"Authorization": "Bearer s3cret-token"}, "/webhook/home"),
            ({}, "/webhook/home?token=s3cret-token"),
        ]:
            assert svc.call("POST", path, body, headers)[0] == 202, (headers, path)
        assert rows() == 3
        status = svc.call("GET", "/api/status")[1]
        assert not any(
            "webhook_token" in w for w in status["warnings"]
        ) and "s3cret-token" not in json.dumps(status)
    finally:
        svc.stop()
    # A server with a token of its own: only that one opens its URL; the shared one still opens
    # the others'. Whoever runs "parents" cannot post as "home".
    home = jds.dataclasses.replace(cfg.servers[0], webhook_token="home-only-token")
    svc = Running(jds.dataclasses.replace(cfg, servers=(home, cfg.servers[1])))
    try:
        for token, path, expected in [
            ("s3cret-token", "/webhook/home", 401),
            ("home-only-token", "/webhook/home", 202),
            ("home-only-token", "/webhook/parents", 401),
            ("s3cret-token", "/webhook/parents", 202),
        ]:
            assert svc.call("POST", path, body, {"X-Webhook-Token": token})[0] == expected, (
                token,
                path,
            )
        assert "home-only-token" not in json.dumps(svc.call("GET", "/api/status")[1])
        assert "home-only-token" not in json.dumps(jds.masked(svc.service.config))
    finally:
        svc.stop()
        for f in fakes:
            f.close()
    # Without the shared token, the server without a token of its own is named in a warning.
    open_one = jds.dataclasses.replace(cfg, webhook_token="", servers=(home, cfg.servers[1]))
    assert jds.security_warnings(open_one)[0].startswith("No webhook token for parents")


def test_prometheus_scrapes_metrics_with_the_api_token_as_the_readme_and_chart_say(cluster):
    import yaml

    c = cluster(
        extra={
            "server": {
                "auth": {"username": "admin", "password": "correct horse"},
                "api_token": TOKEN,
            }
        }
    )
    readme = (HERE / "README.md").read_text()
    block = re.search(r"```yaml\n(scrape_configs:.*?)```", readme, re.S).group(1)
    job = yaml.safe_load(block)["scrape_configs"][0]
    assert job["authorization"]["type"] == "Bearer" and "api_token" in block
    assert c.svc.call("GET", "/metrics")[0] == 401, (
        "a plain scrape is refused once a sign-in is set"
    )
    status, text = c.svc.call(
        "GET", "/metrics", headers={"Authorization": f"{job['authorization']['type']} {TOKEN}"}
    )
    assert status == 200 and f'jellyfin_db_sync_build_info{{version="{jds.__version__}"}} 1' in text
    monitor = (CHART / "templates" / "servicemonitor.yaml").read_text()
    assert (
        "type: Bearer" in monitor
        and "key: api-token" in monitor
        and ".Values.secrets.apiToken" in monitor
    )
    assert "/metrics" in (HERE / "deploy" / "docker-compose.yaml").read_text()


def test_dashboard_and_api_need_sign_in_and_refuse_cross_site_writes(cluster):
    import base64

    c = cluster(
        extra={
            "server": {
                "auth": {"username": "admin", "password": "correct horse"},
                "api_token": TOKEN,
            }
        }
    )
    svc = c.svc
    basic = {"Authorization": "Basic " + base64.b64encode(b"admin:correct horse").decode()}
    assert svc.call("GET", "/api/status")[0] == 401
    assert svc.call("GET", "/metrics")[0] == 401
    assert (
        svc.call(
            "GET",
            "/api/status",
            headers={"Authorization": "Basic " + base64.b64encode(b"admin:nope").decode()},
        )[0]
        == 401
    )
    assert svc.call("GET", "/api/status", headers=basic)[0] == 200
    assert svc.call("GET", "/api/status", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert svc.call("GET", "/healthz")[0] == 200 and svc.call("GET", "/readyz")[0] == 200
    assert svc.call("GET", "/")[0] == 303
    status, page = svc.call("GET", "/login")
    assert status == 200 and "Sign in" in page
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert svc.call("POST", "/login", "username=admin&password=guess", form)[0] == 401
    conn = HTTPConnection("127.0.0.1", svc.port, timeout=5)
    conn.request("POST", "/login", "username=admin&password=correct+horse", form)
    resp = conn.getresponse()
    resp.read()
    cookie = resp.getheader("Set-Cookie")
    assert (
        resp.status == 303
        and "HttpOnly" in cookie
        and "SameSite=Strict" in cookie.replace("strict", "Strict")
    )
    session = {"Cookie": cookie.split(";")[0]}
    assert svc.call("GET", "/api/status", headers=session)[0] == 200
    host = {"Host": f"127.0.0.1:{svc.port}"}
    evil = svc.call(
        "POST", "/api/events/1/retry", headers={**session, **host, "Origin": "http://evil.example"}
    )
    assert evil[0] == 403 and "cross-site" in evil[1]["error"]
    evil = svc.call(
        "POST", "/api/events/1/retry", headers={**session, "Sec-Fetch-Site": "cross-site"}
    )
    assert evil[0] == 403
    same = svc.call(
        "POST",
        "/api/events/1/retry",
        headers={
            **session,
            **host,
            "Origin": f"http://127.0.0.1:{svc.port}",
            "Sec-Fetch-Site": "same-origin",
        },
    )
    assert same[0] == 404, "a same-site write passes the guard (and finds no such job)"
    assert svc.call("POST", "/api/events/1/retry")[0] == 401, "a write needs sign-in too"
    assert svc.call("POST", "/webhook/home", fixture("UserDataSaved-played.json"))[0] == 202, (
        "webhooks stay open"
    )
    assert svc.call("POST", "/logout", headers=session)[0] == 200
    assert svc.call("GET", "/api/status", headers=session)[0] == 401
    status = svc.call("GET", "/api/status", headers=basic)[1]
    assert "correct horse" not in json.dumps(status) and not any(
        "server.auth" in w for w in status["warnings"]
    )


FORM = "application/x-www-form-urlencoded"


def test_a_restart_signs_nobody_out_and_a_sign_out_lasts(cluster):
    c = cluster(extra={"server": {"auth": {"username": "admin", "password": "correct horse"}}})

    def sign_in() -> dict:
        conn = HTTPConnection("127.0.0.1", c.svc.port, timeout=5)
        conn.request(
            "POST", "/login", "username=admin&password=correct+horse", {"Content-Type": FORM}
        )
        resp = conn.getresponse()
        resp.read()
        conn.close()
        return {"Cookie": resp.getheader("Set-Cookie").split(";")[0]}

    session = sign_in()
    c.svc.stop()
    c.start()  # the same database, as after "docker restart"
    assert c.svc.call("GET", "/api/status", headers=session)[0] == 200, "still signed in"
    cookie = session["Cookie"].split("=", 1)[1]
    for name in ("sync.db", "sync.db-wal"):
        assert cookie.encode() not in (c.tmp / name).read_bytes(), "the file keeps a hash only"
    assert c.svc.call("POST", "/logout", headers=session)[0] == 200
    c.svc.stop()
    c.start()
    assert c.svc.call("GET", "/api/status", headers=session)[0] == 401, (
        "signed out stays signed out"
    )


def test_guessing_tokens_and_cross_site_tricks_are_refused(cluster, receiver):
    c = cluster(
        extra={
            "server": {"public_url": "https://sync.example.com"},
            "alerts": {"urls": [f"{receiver.url}/hook"]},
        }
    )
    svc = c.svc
    retry = "/api/events/1/retry"
    token = {"Authorization": f"Bearer {TEST_API_TOKEN}"}
    # Origin "null" (a sandboxed frame, a file: page) without Sec-Fetch-Site is never our page.
    assert svc.call("POST", retry, headers={**token, "Origin": "null"})[0] == 403
    # Our public address, but over plain http: refused; over https: a same-site write.
    assert svc.call("POST", retry, headers={**token, "Origin": "http://sync.example.com"})[0] == 403
    assert (
        svc.call("POST", retry, headers={**token, "Origin": "https://sync.example.com"})[0] == 404
    )
    # "Send test" once, then a pause: not a way to flood someone's phone.
    assert svc.call("POST", "/api/alerts/test", headers=token)[0] == 200
    status, said = svc.call("POST", "/api/alerts/test", headers=token)
    assert status == 429 and "try again" in said["error"] and len(receiver.bodies("/hook")) == 1
    # Guessing the API token: ten wrong ones, then the address waits, right token or not.
    wrong = {"Authorization": "Bearer " + "x" * 32}
    assert [svc.call("POST", retry, headers=wrong)[0] for _ in range(10)] == [403] * 10
    assert svc.call("POST", retry, headers=wrong)[0] == 429
    assert svc.call("POST", retry, headers=token)[0] == 429, "a guess during the wait tells nothing"
    assert svc.call("POST", "/webhook/home", fixture("UserDataSaved-played.json"))[0] == 202, (
        "webhooks go on"
    )


def test_what_a_hostile_run_found_gets_400_and_one_log_line(cluster, caplog):
    c = cluster(extra={"server": SIGN_IN})
    svc = c.svc
    token = {"Authorization": f"Bearer {TEST_API_TOKEN}"}
    form = {"Content-Type": FORM}
    # An Origin no URL parser reads: not our page.
    for origin in ("http://[::1", "http://[x]", "http://a:port/"):
        assert (
            svc.call("POST", "/login", "username=a&password=b", {**form, "Origin": origin})[0]
            == 403
        ), origin
    # A header that is not UTF-8 (raw bytes through a socket: http.client would refuse them).
    for header in (b"Authorization: Bearer \xe9", b"Origin: \xe9", b"Sec-Fetch-Site: \xe9"):
        with socket.create_connection(("127.0.0.1", int(svc.port))) as s:
            s.sendall(
                b"POST /api/reconcile HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                + header
                + b"\r\n\r\n"
            )
            assert s.recv(100).startswith(b"HTTP/1.1 400"), header
    # A search of 50,000 characters (SQLite's LIKE refuses such a pattern).
    for path in ("/api/sync-log?item_name=", "/api/inspect?q=", "/api/dashboard?username="):
        status, said = svc.call("GET", path + "a" * 50_000, headers=token)
        assert status == 400 and "at most 1000 characters" in said["detail"], (path, said)
    assert "Traceback" not in caplog.text and "unexpected error" not in caplog.text


def malformed_bodies(n: int = 600) -> list[bytes]:
    """A corpus of bodies a broken or hostile sender could post: every one must get a 4xx."""
    import random

    rnd = random.Random(20261124)
    base = fixture("UserDataSaved-played.json")
    junk_values = [
        None,
        True,
        3.5,
        -1,
        10**30,
        "",
        "x" * 40_000,
        "\u202e\U0001f600",
        [],
        {},
        [1, [2, [3]]],
        {"a": {"b": {"c": {}}}},
        "dead-beef",
        "NaN",
        "1e309",
    ]
    bodies: list[bytes] = [
        b"",
        b" ",
        b"null",
        b"[]",
        b"42",
        b'"text"',
        b"{",
        b"{]",
        b"\x00\x01\x02",
        b"\xff" * 10,
        b'{"NotificationType": 1}',
        b'{"NotificationType": ""}',
        b"[" * 5000 + b"]" * 5000,
        json.dumps(
            {"NotificationType": "UserDataSaved", "nest": json.loads("[" * 50 + "]" * 50)}
        ).encode(),
    ]
    typed_keys = [
        "ItemId",
        "UserId",
        "Played",
        "Favorite",
        "PlaybackPositionTicks",
        "Rating",
        "NotificationUsername",
        "SeriesId",
        "PlayCount",
        "IsPaused",
        "PlayedToCompletion",
    ]
    while len(bodies) < n:
        kind = rnd.randrange(5)
        body = copy.deepcopy(base)
        if kind == 0:  # a key the sync needs, with the wrong type or a garbage value
            key = rnd.choice(typed_keys)
            body[key] = rnd.choice(
                [v for v in junk_values if v not in ("", None)] + ["maybe", "zz" * 16]
            )
            if (
                key in ("NotificationUsername",)
                and isinstance(body[key], str)
                and len(body[key]) < 1000
            ):
                body[key] = 12345
        elif kind == 1:  # a needed key missing
            for key in rnd.sample(
                ["ItemId", "UserId", "NotificationUsername", "NotificationType"], rnd.randint(1, 3)
            ):
                body.pop(key, None)
            if "NotificationType" in body and all(
                k in body for k in ("ItemId", "UserId", "NotificationUsername")
            ):
                body.pop("ItemId")
        elif kind == 2:  # truncated or corrupted JSON text
            text = json.dumps(body)
            cut = rnd.randrange(1, len(text) - 1)
            bodies.append(
                text[:cut].encode()
                if rnd.random() < 0.5
                else (text[:cut] + "\x07}" + text[cut:]).encode()
            )
            continue
        elif kind == 3:  # a huge string somewhere
            body[rnd.choice(["Name", "Overview", "ItemId"])] = "é" * rnd.choice([40_000, 70_000])
            body["ItemId"] = body["ItemId"] if len(body["ItemId"]) < 100 else body["ItemId"]
        else:  # not an object at all, or a deeply nested one
            bodies.append(
                json.dumps(
                    rnd.choice([[body], "s", 1.5, None, json.loads("[" * 30 + "]" * 30)])
                ).encode()
            )
            continue
        if harmless(body, base):
            continue  # still a valid event (Favorite true, Rating 3.5…): not garbage
        bodies.append(json.dumps(body, ensure_ascii=rnd.random() < 0.5).encode())
    return bodies + [b for _, b in poison_bodies()]


def harmless(body: dict, base: dict) -> bool:
    """Is this mutation of a valid body still valid, by the plugin's own types?"""
    bool_keys = {"Played", "Favorite", "IsPaused", "PlayedToCompletion"}
    for key in set(body) | set(base):
        value = body.get(key)
        if key in base and value == base[key]:
            continue
        if key in bool_keys and isinstance(value, bool):
            continue
        if key == "Rating" and type(value) in (int, float) and 0 <= value <= 10:
            continue
        return False
    return True


def test_password_guessing_is_limited_per_address_and_never_holds_up_webhooks(cluster, monkeypatch):
    import base64

    monkeypatch.setattr(jds, "SIGN_IN_WINDOW", 3.0)  # instead of 10 minutes
    c = cluster(
        extra={
            "server": {
                "auth": {"username": "admin", "password": "correct horse"},
                "api_token": TOKEN,
            }
        }
    )
    svc = c.svc
    form = {"Content-Type": "application/x-www-form-urlencoded"}

    def sign_in(password: str):
        conn = HTTPConnection("127.0.0.1", svc.port, timeout=10)
        conn.request("POST", "/login", f"username=admin&password={password}", form)
        resp = conn.getresponse()
        page = resp.read().decode()
        conn.close()
        return resp.status, resp.getheader("Retry-After"), page

    # Ten guesses at once: all refused, and a webhook sent meanwhile is answered (at most one
    # failed sign-in at a time is slowed down, in one of the request threads).
    with ThreadPoolExecutor(10) as pool:
        guesses = [pool.submit(sign_in, f"guess{i}") for i in range(10)]
        assert svc.call("POST", "/webhook/home", fixture("UserDataSaved-played.json"))[0] == 202
        assert [g.result()[0] for g in guesses] == [401] * 10
    # The eleventh try from this address is turned away, even with the right password…
    status, retry_after, page = sign_in("correct+horse")
    assert status == 429 and 1 <= int(retry_after) <= 3 and "Too many failed sign-ins" in page
    basic = {"Authorization": "Basic " + base64.b64encode(b"admin:correct horse").decode()}
    assert svc.call("GET", "/api/status", headers=basic)[0] == 429
    # …while the API token and webhooks keep working.
    assert svc.call("GET", "/api/status", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert svc.call("POST", "/webhook/home", fixture("UserDataSaved-favorite.json"))[0] == 202
    later = time.time() + 3.1  # the window has passed (on the service's clock)
    monkeypatch.setattr(jds, "utcnow", lambda: later)
    assert sign_in("correct+horse")[0] == 303
    # Wrong HTTP basic credentials count as failed sign-ins too.
    wrong = {"Authorization": "Basic " + base64.b64encode(b"admin:nope").decode()}
    for _ in range(10):
        assert svc.call("GET", "/api/status", headers=wrong)[0] == 401
    assert sign_in("correct+horse")[0] == 429


def test_hostile_bodies_get_4xx_write_nothing_and_leave_the_service_healthy(cluster):
    c = cluster()
    svc = c.svc
    before = svc.store._rows("SELECT count(*) FROM inbox")[0][0]
    corpus = malformed_bodies(600)
    assert len(corpus) >= 500
    accepted = []
    for body in corpus:
        status, answer = svc.call("POST", "/webhook/home", body)
        assert status in (200, 202, 400, 404, 413), (status, body[:200])
        if status >= 400:
            assert isinstance(answer, dict) and answer.get("error"), answer
        else:
            accepted.append(body)
    # Every body in the corpus is garbage: none may be accepted, nothing may be stored.
    assert accepted == []
    assert svc.store._rows("SELECT count(*) FROM inbox")[0][0] == before
    assert svc.call("GET", "/healthz")[0] == 200 and svc.call("GET", "/readyz")[0] == 200
    c["home"].user_marks("alice", "Heat", True)  # and it still syncs
    eventually(lambda: c["parents"].ud("alice", "Heat")["Played"], what="a sync after the fuzzing")


def test_a_locked_database_answers_503_and_recovers(cluster):
    c = cluster()
    blocker = jds.sqlite3.connect(str(c.tmp / "sync.db"), isolation_level=None, timeout=1)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        status, body = c.svc.call("POST", "/webhook/home", fixture("UserDataSaved-played.json"))
        assert status == 503 and "cannot store" in body["error"]
        assert time.monotonic() - started < 5
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert c.svc.call("POST", "/webhook/home", fixture("UserDataSaved-played.json"))[0] == 202


# ── Hardening: poison input, stuck pipelines, hostile clients ────────────────


def poison_bodies() -> list[tuple[str, bytes]]:
    """(the field a 400 must name, body): what an outside review stored with 202 and then
    stopped the planner with, or stored as nonsense."""
    base = fixture("UserDataSaved-played.json")

    def body(**changes) -> bytes:
        return json.dumps(dict(base, **changes)).encode()  # ensure_ascii: lone surrogates as \ud800

    return [
        ("Name", body(Name={"a": 1})),
        ("Name", body(Name=["x"])),
        ("Name", body(Name="\ud800x")),
        ("NotificationUsername", body(NotificationUsername="al\udc00ice")),
        ("ItemType", body(ItemType=["Movie"])),
        ("LastPlayedDate", body(LastPlayedDate="yesterday")),
        ("LastPlayedDate", body(LastPlayedDate=12345)),
        ("PlayCount", body(PlayCount=-3)),
        ("PlaybackPositionTicks", body(PlaybackPositionTicks=-5)),
        ("PlaybackPositionTicks", body(PlaybackPositionTicks=1e30)),
        ("PlaybackPositionTicks", body(PlaybackPositionTicks=10**30)),
        ("SaveReason", body(SaveReason=7)),
        ("Name", body(Name="N").replace(b'"Name": "N"', b'"Name": 1e400')),
        ("UtcTimestamp", body(UtcTimestamp="2026-13-01T00:00:00Z")),
        ("SeriesName", body(SeriesName="x" * (jds.MAX_STRING_CHARS + 1))),
    ]


def test_poison_webhooks_are_refused_and_syncing_goes_on(cluster):
    c = cluster()
    svc = c.svc
    before = svc.store._rows("SELECT count(*) FROM inbox")[0][0]
    for field, body in poison_bodies():
        status, answer = svc.call("POST", "/webhook/home", body)
        assert status == 400 and answer["error"].startswith(field), (field, status, answer)
    assert svc.store._rows("SELECT count(*) FROM inbox")[0][0] == before, (
        "a refused body is never stored"
    )
    # As a user would: mark something played right after; it reaches the others at once.
    c["home"].user_marks("alice", "Heat", True)
    eventually(lambda: c["parents"].ud("alice", "Heat")["Played"], what="a sync after the poison")
    eventually(lambda: c["public"].ud("Alice", "Heat")["Played"], what="a sync after the poison")
    assert svc.call("GET", "/api/events/failed")[1] == []


def test_a_row_that_cannot_be_planned_fails_alone_and_can_be_retried_or_discarded(cluster):
    # Rows stored before these checks existed (or by a bug of ours): the planner must mark each
    # failed, go on with the rows behind it, and not retry it every second forever.
    c = cluster()
    svc, home = c.svc, c["home"]
    uid, iid = home.user("alice"), home.item("Dune")
    good = home.played_payload(uid, iid)
    poison = dict(good, Name={"a": 1})
    with svc.service.syncer._wake:  # all three in one planner batch
        svc.store.add_event("home", "UserDataSaved", json.dumps(poison))
        svc.store.add_event("home", "UserDataSaved", "{not json")
        svc.store.add_event("home", "UserDataSaved", json.dumps(good))
    svc.service.syncer.wake_planner()
    eventually(
        lambda: c["parents"].ud("alice", "Dune")["Played"], what="the good row behind two bad ones"
    )
    failed = eventually(
        lambda: (
            len(svc.call("GET", "/api/events/failed")[1]) == 2
            and svc.call("GET", "/api/events/failed")[1]
        )
    )
    assert {f["field"] for f in failed} == {"event"} and {f["source_server"] for f in failed} == {
        "home"
    }
    assert any("JSON" in f["last_error"] or "Expecting" in f["last_error"] for f in failed)
    assert any("dict" in f["last_error"] for f in failed)
    # Nothing stays unplanned (parents' echo of the good row may still be arriving: it is planned)
    eventually(lambda: svc.store.count_unplanned() == 0, what="every row planned or failed")
    assert svc.call("GET", "/api/status")[1]["queue"]["failed_events"] == 2
    assert "events_failed" in json.dumps(svc.service.syncer.counters.snapshot())
    # Retry puts the row back to the planner (it fails again: still one failed entry for it);
    # discard drops it.
    first = min(f["id"] for f in failed)
    assert svc.call("POST", f"/api/events/{first}/retry")[0] == 200
    eventually(
        lambda: (
            len(svc.call("GET", "/api/events/failed")[1]) == 2 and svc.store.count_unplanned() == 0
        )
    )
    for f in svc.call("GET", "/api/events/failed")[1]:
        assert svc.call("POST", f"/api/events/{f['id']}/discard")[0] == 200
    assert svc.call("GET", "/api/events/failed")[1] == []
    c["home"].user_marks("alice", "Heat", True)
    eventually(lambda: c["parents"].ud("alice", "Heat")["Played"], what="a sync after the failures")


@pytest.mark.slow
def test_a_stuck_planner_or_a_dead_thread_shows_in_readyz_and_metrics_and_is_restarted(
    cluster, monkeypatch, caplog
):
    monkeypatch.setattr(jds, "READY_CACHE_SECONDS", 0.0)
    monkeypatch.setattr(jds, "STUCK_SECONDS", 0.5)
    c = cluster()
    svc, syncer = c.svc, c.svc.service.syncer
    real = syncer.plan_pending

    def dies():
        raise SystemExit("a bug that ends the thread")

    monkeypatch.setattr(syncer, "plan_pending", dies)
    syncer.wake_planner()
    assert (
        svc.call(
            "POST",
            "/webhook/home",
            c["home"].played_payload(c["home"].user("bob"), c["home"].item("Heat")),
        )[0]
        == 202
    )
    status, ready = eventually(
        lambda: (r := svc.call("GET", "/readyz"))[0] == 503 and r, 5, what="readyz 503"
    )
    text = json.dumps(ready)
    assert "planner" in text or "stuck" in text, ready
    eventually(
        lambda: "stuck" in json.dumps(svc.call("GET", "/readyz")[1]), 5, what="the stuck reason"
    )
    assert any(p.startswith("stuck") for p in svc.call("GET", "/api/status")[1]["problems"])
    metrics = svc.call("GET", "/metrics")[1]
    age = float(
        re.search(
            r"^jellyfin_db_sync_inbox_oldest_unplanned_age_seconds (\S+)$", metrics, re.M
        ).group(1)
    )
    assert age > 0.5
    # The supervisor looks every SUPERVISE_SECONDS: on a busy machine "stuck" can show first.
    restarts = r'thread_restarts_total\{thread="planner"\} [1-9]'
    eventually(
        lambda: re.search(restarts, svc.call("GET", "/metrics")[1]), 5, what="the planner restarted"
    )
    assert "thread planner had stopped: restarted" in caplog.text
    monkeypatch.setattr(
        syncer, "plan_pending", real
    )  # the bug is fixed; the next restart plans again
    eventually(
        lambda: c["parents"].ud("bob", "Heat")["Played"],
        70,
        what="the change once the planner is back",
    )
    eventually(lambda: svc.call("GET", "/readyz")[0] == 200, 5, what="ready again")


def test_a_planner_that_keeps_failing_is_not_ready_at_once_and_says_why(cluster, monkeypatch):
    monkeypatch.setattr(jds, "READY_CACHE_SECONDS", 0.0)  # STUCK_SECONDS stays a minute
    c = cluster()
    svc, syncer = c.svc, c.svc.service.syncer
    real = syncer.plan_pending

    def fails():  # what a file without an index its statements name did (issue 21)
        raise jds.sqlite3.OperationalError("no such index: jobs_removal")

    monkeypatch.setattr(syncer, "plan_pending", fails)
    c["home"].user_marks("alice", "Heat", True)
    eventually(lambda: svc.call("GET", "/readyz")[0] == 503, 10, what="readyz 503 before a minute")
    problems = svc.call("GET", "/api/status")[1]["problems"]
    assert len(problems) == 1 and problems[0].startswith("webhooks cannot be planned:"), problems
    assert "no such index: jobs_removal" in problems[0]
    monkeypatch.setattr(syncer, "plan_pending", real)
    eventually(
        lambda: c["parents"].ud("alice", "Heat")["Played"],
        30,
        what="the change once planning works",
    )
    eventually(lambda: svc.call("GET", "/readyz")[0] == 200, 5, what="ready again")
    assert svc.call("GET", "/api/status")[1]["problems"] == []


def test_readyz_fails_while_webhooks_cannot_be_stored_and_recovers_by_itself(
    tmp_path, fake_servers
):
    """A full disk, as the service meets it: a file-size limit on its process (as a nearly full
    volume would), so the database cannot grow; then room again, without a restart."""
    import resource

    home, parents = fake_servers("home", "parents")
    for f in (home, parents):
        f.add_user("alice")
        f.add_item("Heat", "Movie", "/media/movies/Heat (1995)/Heat.mkv")
    port = free_port()
    config = write_config(tmp_path, [home, parents], port=port)

    def small_volume():  # in the child, before the program starts
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, resource.RLIM_INFINITY))

    proc = start_process(config, port, preexec_fn=small_volume)
    svc = Running.of(port)  # the service is the process
    body = home.played_payload(home.user("alice"), home.item("Heat"))
    answers = []
    for i in range(4000):
        body["Provider_Note"] = (
            f"{i:05}" + "x" * 8000
        )  # distinct webhooks, each needing room of its own
        answers.append(svc.call("POST", "/webhook/home", body)[0])
        if answers[-1] == 503:
            break
    assert answers[-1] == 503 and set(answers[:-1]) == {202}, answers[-3:]
    status, ready = eventually(
        lambda: (r := svc.call("GET", "/readyz"))[0] == 503 and r, 10, what="not ready"
    )
    assert "webhooks cannot be stored" in json.dumps(ready), ready
    resource.prlimit(
        proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    )
    eventually(
        lambda: svc.call("GET", "/readyz")[0] == 200, 10, what="ready again without a webhook"
    )
    assert svc.call("POST", "/webhook/home", body)[0] == 202
    shut_down(proc, [])


def test_one_host_holding_over_a_thousand_connections_cannot_keep_webhooks_out(cluster, caplog):
    c = cluster()
    svc, home = c.svc, c["home"]
    held = []
    per_client = svc.listener.limit  # half the connections the service takes: 1,024
    try:
        for i in range(
            per_client + 50
        ):  # from 127.0.0.2: another host, as far as the service can tell
            s = socket.socket()
            s.bind(("127.0.0.2", 0))
            s.connect(("127.0.0.1", int(svc.port)))
            if i % 2:
                with contextlib.suppress(OSError):  # refused at once: reset
                    s.send(b"P")  # the first byte of a request that trickles in
            held.append(s)
        for round_ in range(3):  # while they are held, and trickle on
            for s in held[1::2]:
                with contextlib.suppress(OSError):
                    s.send(b"O")
            body = home.played_payload(
                home.user("alice"), home.item("Heat"), UtcTimestamp=iso(time.time() + round_)
            )
            assert svc.call("POST", "/webhook/home", body)[0] == 202  # within the call's 10 s
        eventually(
            lambda: "connections from 127.0.0.2 refused" in caplog.text, what="the refusal said"
        )
        assert caplog.text.count("connections from 127.0.0.2 refused") == 1, "once a minute at most"
        eventually(lambda: c["parents"].ud("alice", "Heat")["Played"], what="the webhook's change")
    finally:
        for s in held:
            s.close()


@pytest.mark.slow
def test_readyz_is_cheap_and_bounded_while_the_database_is_locked(cluster, monkeypatch):
    monkeypatch.setattr(jds, "READY_CACHE_SECONDS", 1.0)  # a shorter cache, the same rules
    c = cluster()
    blocker = jds.sqlite3.connect(str(c.tmp / "sync.db"), isolation_level=None, timeout=1)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        # Past the last cached answer: one bounded check (0.5 s at most)…
        eventually(
            lambda: c.svc.call("GET", "/readyz")[0] == 503,
            jds.READY_CACHE_SECONDS + 3,
            what="the check",
        )
        with ThreadPoolExecutor(8) as pool:  # …that the others are answered from
            answers = list(
                pool.map(lambda _: c.svc.call("GET", "/readyz"), range(8))
            )  # 10 s client timeout
        assert all(status == 503 for status, _ in answers), answers
        assert any("database" in json.dumps(body) for _, body in answers)
        assert c.svc.call("GET", "/healthz")[0] == 200
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    eventually(
        lambda: c.svc.call("GET", "/readyz")[0] == 200,
        jds.READY_CACHE_SECONDS + 3,
        what="ready again",
    )


@pytest.mark.slow
def test_a_webhook_dated_in_the_future_cannot_freeze_an_item(cluster, caplog):
    c = cluster()
    home, parents = c["home"], c["parents"]
    uid, iid = home.user("alice"), home.item("Arrival")
    forged = home.played_payload(uid, iid, UtcTimestamp="2099-01-01T00:00:00.0000000Z")
    forged["LastPlayedDate"] = "2099-01-01T00:00:00.0000000Z"
    assert c.svc.call("POST", "/webhook/home", forged)[0] == 202
    eventually(lambda: parents.ud("alice", "Arrival")["Played"], what="the forged played")
    assert parents.ud("alice", "Arrival")["LastPlayedDate"] < "2099"  # clamped too
    c.settle()
    home.user_marks("alice", "Arrival", False)  # a real change, now: it must win
    eventually(lambda: not parents.ud("alice", "Arrival")["Played"], what="the later real change")
    assert "ahead of our clock" in caplog.text


def test_dns_rebinding_names_are_refused_without_sign_in(cluster):
    c = cluster(extra={"server": {"allowed_hosts": ["sync.example.com"]}})
    svc = c.svc
    assert svc.call("GET", "/api/status", headers={"Host": "evil.example"})[0] == 403
    assert svc.call("GET", "/", headers={"Host": "evil.example:8080"})[0] == 403
    for host in (
        f"127.0.0.1:{svc.port}",
        "localhost",
        "nas.local",
        "jellyfin-db-sync:8097",
        "[::1]:1",
        "sync.example.com",
    ):
        assert svc.call("GET", "/api/status", headers={"Host": host})[0] == 200, host
    # Webhooks are not refused for their Host: the token guards them (a page can post to an IP).
    assert (
        svc.call(
            "POST", "/webhook/home", fixture("UserDataSaved-played.json"), {"Host": "evil.example"}
        )[0]
        == 202
    )
    signed = cluster(extra={"server": {"auth": {"username": "admin", "password": "correct horse"}}})
    assert (
        signed.svc.call("GET", "/api/status", headers={"Host": "evil.example"})[0] == 401
    )  # signing in guards it


def test_behind_a_reverse_proxy_the_dashboard_works_and_the_cookie_is_secure(cluster):
    c = cluster(
        extra={
            "server": {
                "auth": {"username": "admin", "password": "correct horse"},
                "public_url": "https://sync.example.com/",
            }
        }
    )
    svc = c.svc
    form = {"Content-Type": "application/x-www-form-urlencoded"}

    def sign_in(headers: dict):
        conn = HTTPConnection("127.0.0.1", svc.port, timeout=10)
        conn.request("POST", "/login", "username=admin&password=correct+horse", {**form, **headers})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        return resp.status, resp.getheader("Set-Cookie") or ""

    status, cookie = sign_in(
        {"Origin": "https://sync.example.com"}
    )  # Host stays the proxy's upstream
    assert status == 303 and "Secure" in cookie and "HttpOnly" in cookie
    assert (
        sign_in({"Sec-Fetch-Site": "same-origin", "Origin": "https://other-name.example"})[0] == 303
    )
    assert sign_in({"Referer": "https://sync.example.com/login"})[0] == 303
    assert sign_in({"Referer": "https://evil.example/page"})[0] == 403
    assert sign_in({"Sec-Fetch-Site": "cross-site", "Origin": "https://sync.example.com"})[0] == 403
    assert sign_in({"Origin": "null"})[0] == 403


def test_every_answer_carries_security_headers_and_the_page_has_no_inline_script():
    html = (HERE / "static" / "index.html").read_text()
    assert not re.search(r"\son[a-z]+=", html) and "<script>" not in html and " style=" not in html
    assert "<script>" not in jds.LOGIN_PAGE and not re.search(r"\son[a-z]+=", jds.LOGIN_PAGE)


def test_security_headers_on_pages_api_errors_and_webhooks(cluster):
    svc = cluster().svc
    for method, path, body in (
        ("GET", "/", None),
        ("GET", "/api/status", None),
        ("GET", "/nosuch", None),
        ("POST", "/webhook/home", json.dumps(fixture("UserDataSaved-played.json"))),
    ):
        conn = HTTPConnection("127.0.0.1", svc.port, timeout=10)
        conn.request(method, path, body)
        resp = conn.getresponse()
        resp.read()
        conn.close()
        assert "frame-ancestors 'none'" in resp.getheader("Content-Security-Policy", ""), path
        assert "script-src 'self'" in resp.getheader("Content-Security-Policy", ""), path
        assert (
            resp.getheader("X-Frame-Options") == "DENY"
            and resp.getheader("X-Content-Type-Options") == "nosniff"
        )


def test_out_of_range_numbers_in_urls_are_4xx_not_500(cluster):
    c = cluster(extra={"server": {"api_token": TOKEN}})
    svc, huge = c.svc, "99999999999999999999999"
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    for path in (
        "/api/sync-log",
        "/api/events/failed",
        "/api/events/pending",
        "/api/events/waiting",
    ):
        assert svc.call("GET", f"{path}?offset={huge}", headers=bearer)[0] == 400, path
    assert svc.call("POST", f"/api/events/{huge}/retry", headers=bearer)[0] == 404
    assert svc.call("POST", f"/api/events/{huge}/discard", headers=bearer)[0] == 404
    assert svc.call("POST", f"/api/users/passwords/{huge}/ack", headers=bearer)[0] == 404


def test_names_from_outside_cannot_forge_log_lines(cluster, caplog):
    caplog.set_level("INFO", logger="jellyfin_db_sync")
    c = cluster()
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(jds.LogFormatter("%(levelname)s %(message)s"))  # what main() installs
    logging.getLogger("jellyfin_db_sync").addHandler(handler)
    try:
        home = c["home"]
        forged = home.played_payload(
            home.user("alice"), home.item("Dune"), Name="Dune\nERROR forged line\x1b[31m"
        )
        assert c.svc.call("POST", "/webhook/home", forged)[0] == 202
        eventually(lambda: "✓ played" in out.getvalue(), what="the sync's log line")
    finally:
        logging.getLogger("jellyfin_db_sync").removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert not any(line.startswith("ERROR forged") for line in lines)
    assert any('"Dune\\nERROR forged line\\x1b[31m"' in line for line in lines)


def test_metric_labels_come_only_from_known_notification_types(cluster):
    svc = cluster().svc
    for i in range(20):
        assert svc.call("POST", "/webhook/home", {"NotificationType": f"Made-up-{i}"})[0] == 200
    svc.call("POST", "/webhook/home", fixture("SessionStart.json"))
    metrics = svc.call("GET", "/metrics")[1]
    assert "Made-up" not in metrics
    assert 'webhooks_received_total{server="home",type="other"} 20' in metrics
    assert 'type="SessionStart"' in metrics


def test_failed_sign_ins_count_per_ipv6_64(cluster, monkeypatch):
    monkeypatch.setattr(jds, "SIGN_IN_SLOWDOWN", 0.0)  # the pause is not what this test is about
    c = cluster(extra={"server": {"auth": {"username": "admin", "password": "correct horse"}}})
    app = c.svc.service.app

    def sign_in(address: str, password: str) -> str:
        body = f"username=admin&password={password}".encode()
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": "/login",
            "SERVER_NAME": "localhost",
            "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "HTTP_HOST": "localhost",
            "REMOTE_ADDR": address,
            "CONTENT_TYPE": "application/x-www-form-urlencoded",
            "CONTENT_LENGTH": str(len(body)),
            "wsgi.input": io.BytesIO(body),
            "wsgi.url_scheme": "http",
            "wsgi.errors": io.StringIO(),
        }
        answer = []
        b"".join(app(environ, lambda status, headers, exc=None: answer.append(status)))
        return answer[0]

    for i in range(1, 11):
        assert sign_in(f"2001:db8:1:2::{i:x}", "wrong").startswith("401")
    assert sign_in("2001:db8:1:2:ffff::9", "correct+horse").startswith("429")  # same /64
    assert sign_in("2001:db8:1:3::1", "correct+horse").startswith("303")  # another /64
    assert jds.client_key("::ffff:192.0.2.7") == "192.0.2.7"


def test_damaged_newer_and_older_databases_are_handled(tmp_path, fake_servers):
    fakes = fake_servers("home", "parents")
    cfg = write_config(tmp_path, fakes)
    db = tmp_path / "sync.db"
    db.write_bytes(b"this is not a database" * 100)
    res = run_cli("--config", str(cfg))
    assert (
        res.returncode == 1
        and "not a usable SQLite database" in res.stderr
        and "Traceback" not in res.stderr
    )
    db.unlink()
    store = jds.Store(str(db))
    store.set_meta("schema_version", "99")
    store.close()
    res = run_cli("--config", str(cfg))
    assert res.returncode == 1 and "newer" in res.stderr
    # A first-release (schema 1) file is upgraded in place.
    conn = jds.sqlite3.connect(str(db))
    conn.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    conn.execute("DROP INDEX jobs_status_updated")
    conn.commit()
    conn.close()
    store = jds.Store(str(db))
    assert store.get_meta("schema_version") == str(jds.SCHEMA_VERSION)
    assert store._rows("SELECT 1 FROM sqlite_master WHERE name='jobs_status_updated'")
    store.close()


# The older jellyfin-db-sync's schema, exactly as it creates it (docs/older-program.md).
OLDER_SCHEMA = """
CREATE TABLE user_mappings (id INTEGER PRIMARY KEY AUTOINCREMENT, username TEXT NOT NULL,
    server_name TEXT NOT NULL, jellyfin_user_id TEXT NOT NULL,
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP, updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    UNIQUE(username, server_name));
CREATE INDEX idx_user_mappings_username ON user_mappings(username);
CREATE TABLE sync_log (id INTEGER PRIMARY KEY AUTOINCREMENT, event_type TEXT NOT NULL,
    source_server TEXT NOT NULL, target_server TEXT NOT NULL, username TEXT NOT NULL, item_id TEXT,
    item_name TEXT, synced_value TEXT, success BOOLEAN NOT NULL, message TEXT,
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP);
CREATE INDEX idx_sync_log_created_at ON sync_log(created_at DESC);
CREATE INDEX idx_sync_log_filters ON sync_log(source_server, target_server, event_type);
CREATE INDEX idx_sync_log_item_name ON sync_log(item_name);
CREATE INDEX idx_sync_log_success ON sync_log(success);
CREATE TABLE pending_events (id INTEGER PRIMARY KEY AUTOINCREMENT, event_type TEXT NOT NULL,
    source_server TEXT NOT NULL, target_server TEXT NOT NULL, username TEXT NOT NULL,
    user_id TEXT NOT NULL, item_id TEXT NOT NULL, item_name TEXT NOT NULL, item_path TEXT,
    provider_imdb TEXT, provider_tmdb TEXT, provider_tvdb TEXT, event_data TEXT NOT NULL DEFAULT
    '{}',
    status TEXT NOT NULL DEFAULT 'pending', retry_count INTEGER NOT NULL DEFAULT 0,
    max_retries INTEGER NOT NULL DEFAULT 5, last_error TEXT,
    item_not_found_count INTEGER NOT NULL DEFAULT 0, item_not_found_max INTEGER NOT NULL DEFAULT 0,
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP, updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    next_retry_at TIMESTAMP);
CREATE INDEX idx_pending_events_status ON pending_events(status, next_retry_at);
CREATE INDEX idx_pending_events_dedup ON pending_events(event_type, target_server, username,
item_id, status);
CREATE INDEX idx_pending_events_updated ON pending_events(status, updated_at);
CREATE TABLE item_path_cache (id INTEGER PRIMARY KEY AUTOINCREMENT, server_name TEXT NOT NULL,
    item_path TEXT NOT NULL, item_id TEXT NOT NULL, item_name TEXT,
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP, updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    UNIQUE(server_name, item_path));
"""


OLDER_OWED = [
    ("watched", "parents", "Arrival", {"is_played": True}, "pending"),
    ("favorite", "public", "Dune", {"is_favorite": True}, "failed"),
    ("progress", "parents", "Heat", {"position_ticks": 42 * 10**7}, "waiting_for_item"),
    ("audio_stream", "parents", "Heat", {"audio_stream_index": 1}, "pending"),
    ("watched", "public", "Heat", {"is_played": True}, "completed"),  # done: nothing owed
]


def older_database(path: Path, home: FakeJellyfin, owed: list[tuple] = OLDER_OWED) -> None:
    """The older program's file, as a user switching from it has it: WAL, owed changes (kind,
    target, item, its event_data, status), history."""
    conn = jds.sqlite3.connect(str(path))
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(OLDER_SCHEMA)
    uid = home.user("alice")
    for kind, target, item, data, status in owed:
        conn.execute(
            "INSERT INTO pending_events (event_type, source_server, target_server, username, "
            "user_id, item_id,"
            " item_name, event_data, status) VALUES (?, 'home', ?, 'alice', ?, ?, ?, ?, ?)",
            (kind, target, uid, str(uuid.UUID(home.item(item))), item, json.dumps(data), status),
        )
    conn.execute(
        "INSERT INTO sync_log (event_type, source_server, target_server, username, item_name, "
        "synced_value, success,"
        " message) VALUES ('watched', 'home', 'parents', 'alice', 'Alien', 'True', 1, 'synced')"
    )
    conn.commit()
    conn.close()


def test_the_older_programs_database_is_carried_over_once(cluster, caplog):
    caplog.set_level("INFO", logger="jellyfin_db_sync")
    c = cluster(start=False)
    db = c.tmp / "sync.db"
    older_database(db, c["home"])
    c.start()
    parents, public = c["parents"], c["public"]
    eventually(lambda: parents.ud("alice", "Arrival")["Played"], what="an owed played change")
    eventually(lambda: public.ud("Alice", "Dune")["IsFavorite"], what="an owed favourite")
    eventually(
        lambda: parents.ud("alice", "Heat")["PlaybackPositionTicks"] == 42 * 10**7,
        what="an owed position",
    )
    assert not public.ud("Alice", "Heat")["Played"], "a finished change is not owed"
    backups = list(c.tmp.glob("sync.db.older-*.bak"))
    assert len(backups) == 1
    old = jds.sqlite3.connect(str(backups[0]))
    assert old.execute("SELECT count(*) FROM pending_events").fetchone()[0] == 5, (
        "the backup is the file as it was"
    )
    old.close()
    assert (
        "older jellyfin-db-sync" in caplog.text and "carried over 3 owed change(s)" in caplog.text
    )
    assert "audio_stream 1" in caplog.text
    log_entries = c.svc.call("GET", "/api/sync-log?result=ok&limit=500")[1]["entries"]
    assert any(e["item_name"] == "Alien" for e in log_entries), "the history came along"
    status = c.svc.call("GET", "/api/status")[1]
    assert status["migration"]["owed"] == 3 and status["migration"]["backup"].endswith(".bak")
    c.svc.stop()
    caplog.clear()
    c.start()  # a second start finds nothing left to migrate
    assert "older jellyfin-db-sync" not in caplog.text
    assert len(list(c.tmp.glob("sync.db.older-*.bak"))) == 1


def schema_of(path: Path) -> dict:
    """A file's schema as SQLite sees it: each table's columns (and WITHOUT ROWID), each index's
    table and columns. (The CREATE text of a table that gained columns by ALTER differs from a
    new one's while meaning the same, so the text itself is not compared; SQLite's own tables,
    such as the sqlite_sequence the older program's AUTOINCREMENT left, cannot be dropped.)"""
    conn = jds.sqlite3.connect(str(path))
    out = {}
    for type_, name, table in conn.execute(
        "SELECT type, name, tbl_name FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE "
        "'sqlite%'"
    ):
        if type_ == "table":
            rowid = conn.execute(
                "SELECT wr FROM pragma_table_list WHERE name=?", (name,)
            ).fetchone()[0]
            out[name] = (
                type_,
                rowid,
                [tuple(r) for r in conn.execute(f"PRAGMA table_info({name})")],
            )
        else:
            out[name] = (type_, table, [r[2] for r in conn.execute(f"PRAGMA index_info({name})")])
    conn.close()
    return out


@pytest.mark.parametrize(
    "start", ["v1", "v2", "v3", "v4-older", "older program", "older program, nothing owed"]
)
def test_every_starting_file_ends_with_a_new_files_schema(tmp_path, fake_servers, start):
    fresh = tmp_path / "fresh.db"
    jds.Store(str(fresh)).close()
    db = tmp_path / "sync.db"
    if start.startswith("older program"):
        (home,) = fake_servers("home")
        home.add_user("alice")
        for name, type_, path, prov in LIBRARY:
            home.add_item(name, type_, path, provider_ids=prov)
        older_database(db, home, [] if "nothing owed" in start else OLDER_OWED)
    else:  # our own earlier releases' files, as each created them (fixtures/schemas)
        conn = jds.sqlite3.connect(str(db))
        conn.executescript((HERE / "fixtures" / "schemas" / f"{start}.sql").read_text())
        conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (start[1],))
        conn.commit()
        conn.close()
    assert schema_of(db) != schema_of(fresh)
    store = jds.Store(str(db))
    assert store.get_meta("schema_version") == str(jds.SCHEMA_VERSION)
    store.close()
    assert schema_of(db) == schema_of(fresh), start
    jds.Store(str(db)).close()  # and a second start changes nothing
    assert schema_of(db) == schema_of(fresh)


def test_another_applications_database_is_looked_at_and_left_alone(tmp_path, fake_servers):
    fakes = fake_servers("home", "parents")
    cfg = write_config(tmp_path, fakes)
    db = tmp_path / "sync.db"
    conn = jds.sqlite3.connect(str(db))
    conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, path TEXT)")
    conn.execute("INSERT INTO photos (path) VALUES ('/pictures/a.jpg')")
    conn.commit()
    conn.close()
    before = db.read_bytes()
    res = run_cli("--check-config", "--config", str(cfg))
    assert (
        res.returncode == 1
        and "✗ database:" in res.stdout
        and "another application's tables" in res.stdout
    )
    res = run_cli("--config", str(cfg))
    assert (
        res.returncode == 1
        and "another application's tables" in res.stderr
        and "Traceback" not in res.stderr
    )
    assert db.read_bytes() == before, (
        "not a byte of its file changed (no tables of ours, no WAL mode)"
    )


def test_switching_from_the_older_program_then_played_and_unplayed_changes_travel(
    tmp_path, fake_servers
):
    """The user's path: the older program ran on its own example config and still owes changes
    (one of them a removal); our program starts on the same config and file; then a played and
    an unplayed change by webhook reach the other server, and nothing is stuck."""
    home, parents = fake_servers("home", "parents")
    for f in (home, parents):
        f.add_user("alice")
        for name, type_, path, prov in LIBRARY:
            f.add_item(name, type_, path, provider_ids=prov)
    parents.mark_played(parents.user("alice"), parents.item("Heat"))  # the owed removal undoes this
    config = tmp_path / "older.yaml"
    config.write_text(older_example([home, parents], tmp_path))
    older_database(
        tmp_path / "older.db",
        home,
        [
            ("watched", "parents", "Arrival", {"is_played": True}, "pending"),
            ("watched", "parents", "Heat", {"is_played": False}, "failed"),
        ],
    )
    check = run_cli("--check-config", "--config", str(config))
    assert "is the older jellyfin-db-sync's; moved over at start" in check.stdout, check.stdout
    port = jds.load_config(config, {}).port
    proc = start_process(config, port)
    svc = Running.of(port)  # the service is the process
    for f in (home, parents):
        f.webhook_url = f"http://127.0.0.1:{port}/webhook/{f.name}"
    # What the older program owed arrives, the removal included.
    eventually(lambda: parents.ud("alice", "Arrival")["Played"], 30, what="the owed played change")
    eventually(
        lambda: not parents.ud("alice", "Heat")["Played"], 45, what="the owed unplayed change"
    )
    home.user_marks("alice", "Dune", True)
    eventually(lambda: parents.ud("alice", "Dune")["Played"], 30, what="a played change by webhook")
    home.user_marks("alice", "Dune", False)
    eventually(
        lambda: not parents.ud("alice", "Dune")["Played"], 45, what="an unplayed change by webhook"
    )
    assert svc.call("GET", "/readyz")[0] == 200
    status = svc.call("GET", "/api/status")[1]
    assert status["problems"] == [] and status["migration"]["owed"] == 2
    shut_down(proc, [])
    text = proc.log_path.read_text()
    assert "no such index" not in text and "ERROR" not in text and "Traceback" not in text, text
    assert schema_of(tmp_path / "older.db") == schema_of(jds.Store(str(tmp_path / "fresh.db")).path)
    check = run_cli("--check-config", "--config", str(config))
    assert (
        check.returncode == 0 and f"✓ database: {tmp_path / 'older.db'} can be used" in check.stdout
    )


def key_paths(value: object, path: str = "") -> set[str]:
    """'database.connected', 'servers[].name', '[].id': every key path of a JSON answer."""
    out = {path} if path else set()
    if isinstance(value, dict):
        for key, child in value.items():
            out |= key_paths(child, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for child in value:
            out |= key_paths(child, f"{path}[]")
        out.add(f"{path}[]")
    return out


def test_the_older_programs_api_answers_with_every_key_it_had(cluster):
    c = cluster(
        max_retries=0,
        policies=[{"prefix": "/media/new", "absent_retry_count": -1, "retry_delay_seconds": 60}],
    )
    home, parents, public = c["home"], c["parents"], c["public"]
    home.user_marks("alice", "Arrival", True)  # synced
    c.settle()
    home.add_item("Nope", "Movie", "/media/new/Nope.mkv")
    home.user_marks("bob", "Nope", True)  # waiting for its item
    public.writes_fail = True
    home.user_favourites(
        "alice", "Dune", True
    )  # public refuses writes: failed at once (max_retries 0)…
    eventually(lambda: c.svc.call("GET", "/api/events/failed")[1], what="a failed change")
    eventually(lambda: c.svc.call("GET", "/api/events/waiting")[1], what="a waiting change")
    public.writes_fail = False
    parents.delay = 2.0  # …and a change in flight, while parents is slow
    home.user_rates("alice", "Heat", True)
    eventually(lambda: c.svc.call("GET", "/api/events/pending")[1], what="a pending change")
    shapes = json.loads((FIXTURES.parent / "older-api-shapes.json").read_text())
    for path, expected in shapes.items():
        if path.startswith("_"):
            continue
        status, answer = c.svc.call("GET", path)
        assert status == 200, path
        missing = set(expected) - key_paths(answer)
        assert not missing, (path, sorted(missing))
    parents.delay = 0
    # Its words in its keys.
    failed = next(f for f in c.svc.call("GET", "/api/events/failed")[1] if f["field"] == "favorite")
    assert (
        failed["event_type"] == "favorite"
        and failed["status"] == "failed"
        and failed["state"] == "failed"
    )
    waiting = next(
        w for w in c.svc.call("GET", "/api/events/waiting")[1] if w["item_name"].startswith("Nope")
    )
    assert waiting["status"] == "waiting_for_item" and waiting["item_path"].endswith("nope.mkv")
    assert waiting["item_not_found_max"] == -1
    # Its sync-log filters work, and mean what they meant.
    log_ = lambda q: c.svc.call("GET", "/api/sync-log?" + q)[1]  # noqa: E731
    assert (
        log_("source_server=nosuch")["entries"] == [] and log_("source_server=nosuch")["total"] == 0
    )
    arrival = log_("source_server=home&target_server=parents&event_type=watched&item_name=arriv")[
        "entries"
    ]
    assert arrival and all(e["event_type"] == "watched" and e["success"] is True for e in arrival)
    assert log_("since_minutes=0.0001")["total"] <= log_("since_minutes=60")["total"]
    assert all(e["item_id"] == home.item("Arrival") for e in arrival)
    # Its audio and subtitle switches are off by default (no version can write them with an API
    # key): nothing to warn about. Switched on, each server's status says they cannot be synced.
    for server in c.svc.call("GET", "/api/servers")[1]:
        assert not any("subtitle track" in limit for limit in server["limits"]), server
    version = jds.ServerVersion("10.11.8", 10, 11)
    assert any(
        "subtitle track" in line for line in version.limits(jds.SyncConfig(audio_stream=True))
    )
    assert version.limits(jds.SyncConfig()) == []
    # Its other URLs.
    assert c.svc.call("GET", "/webhook/queue")[1].keys() >= {"pending_events", "worker_running"}
    assert c.svc.call("POST", "/webhook/home/", fixture("UserDataSaved-played.json"))[0] == 202


def test_online_backup_and_retention(cluster):
    c = cluster()
    c["home"].user_marks("alice", "Dune", True)
    c.settle()
    res = run_cli("--config", str(c.config_path), "--backup", str(c.tmp / "backup.db"))
    assert res.returncode == 0 and "backup" in res.stdout
    # The database, its WAL and the backup hold generated passwords: their owner's only.
    for name in ("sync.db", "sync.db-wal", "backup.db"):
        assert (c.tmp / name).stat().st_mode & 0o777 == 0o600, name
    again = run_cli("--config", str(c.config_path), "--backup", str(c.tmp / "backup.db"))
    assert again.returncode == 1 and "exists already" in again.stderr, (
        "a backup never overwrites a file"
    )
    copy_ = jds.sqlite3.connect(str(c.tmp / "backup.db"))
    assert copy_.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert copy_.execute("SELECT count(*) FROM sync_log WHERE result='ok'").fetchone()[0] >= 2
    copy_.close()
    store = c.svc.store
    store._conn().execute("UPDATE sync_log SET at = at - 100 * 86400")
    store._conn().execute("UPDATE jobs SET updated_at = updated_at - 100 * 86400")
    store._conn().execute("UPDATE inbox SET received_at = received_at - 100 * 86400")
    store._conn().execute("UPDATE jobs SET status='failed' WHERE id = (SELECT min(id) FROM jobs)")
    assert store.prune_history(time.time() - 30 * 86400) > 0
    assert store._rows("SELECT count(*) FROM sync_log")[0][0] == 0
    assert (
        store._rows("SELECT status FROM jobs")[0][0] == "failed"
        and len(store._rows("SELECT id FROM jobs")) == 1
    )


# ── Probes, status and secrets ───────────────────────────────────────────────


def test_probes_and_status_never_show_an_api_key(cluster, monkeypatch):
    monkeypatch.setattr(jds, "READY_CACHE_SECONDS", 0.0)  # each /readyz checks afresh
    c = cluster()
    svc = c.svc
    c["home"].user_marks("alice", "Arrival", True)
    c.settle()
    assert svc.call("GET", "/healthz") == (200, "ok")
    status, ready = svc.call("GET", "/readyz")
    assert status == 200 and ready["status"] == "ready"
    texts = []
    for path in (
        "/api/status",
        "/api/queue",
        "/api/servers",
        "/api/events/pending",
        "/api/events/waiting",
        "/api/events/failed",
        "/api/sync-log",
    ):
        status, body = svc.call("GET", path)
        assert status == 200, path
        texts.append(json.dumps(body))
    st = svc.call("GET", "/api/status")[1]
    assert st["version"] == jds.__version__ and {s["name"] for s in st["servers"]} == {
        "home",
        "parents",
        "public",
    }
    assert st["sync_stats"]["successful"] >= 2
    log_entries = svc.call("GET", "/api/sync-log?target=parents")[1]["entries"]
    assert any(e["result"] == "ok" and e["new"] == "played" for e in log_entries)
    for f in c.fakes:
        assert all(f.api_key not in t for t in texts)
    # An unreachable Jellyfin is shown in the status, but readiness means "can take webhooks":
    # a 503 would make a load balancer drop the other servers' webhooks, which are never resent.
    c["parents"].status_override = 503
    c.svc.service.syncer.check_server("parents")
    assert svc.call("GET", "/readyz") == (200, {"status": "ready"})
    st = svc.call("GET", "/api/status")[1]
    assert (
        st["status"] == "degraded"
        and not next(s for s in st["servers"] if s["name"] == "parents")["reachable"]
    )


def test_logs_name_changes_and_never_an_api_key(cluster, caplog):
    caplog.set_level("DEBUG", logger="jellyfin_db_sync")
    c = cluster()
    c["home"].user_marks("alice", "Arrival", True)
    c.settle()
    text = caplog.text
    assert 'parents: alice ✓ played "Arrival' in text
    for f in c.fakes:
        assert f.api_key not in text


# ── Config ───────────────────────────────────────────────────────────────────


def run_cli(*args, env=None, timeout=20):
    return subprocess.run(  # noqa: PLW1510 - the exit code is what the tests look at
        [sys.executable, str(HERE / "jellyfin_db_sync.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda d: d["servers"][1].pop("api_key"), "servers[1].api_key"),
        (lambda d: d["servers"][1].update(name=d["servers"][0]["name"]), "servers[1].name"),
        (lambda d: d["servers"][0].update(url="jellyfin.local:8096"), "servers[0].url"),
        (lambda d: d["sync"].update(max_retries="five"), "sync.max_retries"),
        (lambda d: d.update(server={"cpu": "fast"}), "server.cpu"),
        (lambda d: d.update(server={"webhook_token": "short"}), "server.webhook_token"),
        (lambda d: d["servers"][1].update(webhook_token="x" * 15), "servers[1].webhook_token"),
        (lambda d: d.update(server={"public_url": "sync.example.com"}), "server.public_url"),
    ],
)
def test_config_errors_name_the_key_and_exit_2(tmp_path, mutate, key):
    import yaml

    data = {
        "servers": [
            {"name": "a", "url": "http://127.0.0.1:1", "api_key": "k1"},
            {"name": "b", "url": "http://127.0.0.1:2", "api_key": "k2"},
        ],
        "sync": {},
        "database": {"path": str(tmp_path / "x.db")},
    }
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    res = run_cli("--check-config", "--config", str(path))
    assert res.returncode == 2
    assert key in res.stderr and str(path) in res.stderr and "Traceback" not in res.stderr


def older_example(fakes: list[FakeJellyfin], tmp_path: Path) -> str:
    """The older jellyfin-db-sync's example config (its keys and values), with real servers."""
    return f"""
servers:
  - name: {fakes[0].name}
    url: {fakes[0].url}
    api_key: {fakes[0].api_key}
    passwordless: false
  - name: {fakes[1].name}
    url: {fakes[1].url}
    api_key: {fakes[1].api_key}
    passwordless: true
sync:
  playback_progress: true
  watched_status: true
  favorites: true
  ratings: true
  playlists: true
  likes: true
  play_count: true
  last_played_date: true
  audio_stream: true
  subtitle_stream: true
  progress_debounce_seconds: 30
  worker_interval_seconds: 5.0
  max_retries: 5
  dry_run: false
path_sync_policy:
  - prefix: /mnt/nfs/movies
    absent_retry_count: 10
    retry_delay_seconds: 600
  - prefix: /mnt/nfs/tv
    absent_retry_count: -1
    retry_delay_seconds: 300
  - prefix: /mnt/nfs/music
    absent_retry_count: 0
database:
  path: {tmp_path / "older.db"}
  journal_mode: WAL
server:
  host: 0.0.0.0
  port: {free_port()}
logging:
  level: INFO
"""


def test_the_older_programs_configs_start_and_check_clean(tmp_path, fake_servers):
    fakes = fake_servers("wan", "lan")
    path = tmp_path / "older.yaml"
    path.write_text(older_example(fakes, tmp_path))
    res = run_cli("--check-config", "--config", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
    cfg = jds.load_config(path, {})
    assert cfg.warnings == () and cfg.sync.progress_debounce_seconds == 30
    # Its README's shorter example is a subset of the same keys.
    short = "\n".join(
        line
        for line in path.read_text().splitlines()
        if "stream" not in line and "dry_run" not in line
    )
    path.write_text(short)
    assert run_cli("--check-config", "--config", str(path)).returncode == 0
    port = jds.load_config(path, {}).port
    proc = start_process(path, port)
    shut_down(proc, [])
    assert proc.returncode == 0


def test_configs_the_older_program_accepted_are_accepted_with_the_same_meaning(tmp_path):
    import yaml

    data = {
        "servers": [
            {"name": "only", "url": "http://127.0.0.1:1", "api_key": "k", "passwordless": "true"}
        ],
        "server": {"port": "8080", "host": "0.0.0.0"},
        "sync": {"dry_run": "false", "max_retries": "7", "progress_debounce_seconds": "12.5"},
        "database": {"path": str(tmp_path / "x.db"), "journal_mode": "MEMORY"},
        "logging": {"level": "critical"},
        "extra": {},
    }
    data["sync"]["watched"] = True
    path = tmp_path / "lax.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = jds.load_config(path, {})
    assert cfg.servers[0].passwordless is True and cfg.port == 8080 and cfg.sync.max_retries == 7
    assert cfg.sync.dry_run is False and cfg.sync.progress_debounce_seconds == 12.5
    assert (cfg.log_level, cfg.journal_mode) == ("CRITICAL", "WAL")
    text = "\n".join(cfg.warnings)
    assert "sync.watched: unknown key, ignored — did you mean sync.watched_status?" in text
    assert "extra: unknown key" in text and "MEMORY" in text and "nothing to sync" in text
    # --check-config calls them errors (exit 1), naming each key, so a typo is still caught there.
    res = run_cli("--check-config", "--config", str(path))
    assert res.returncode == 1 and "sync.watched" in res.stdout and "did you mean" in res.stdout
    assert "Traceback" not in res.stderr


def filled_example(tmp_path: Path) -> Path:
    """config.example.yaml with its placeholder API keys filled in, as a user would."""
    path = tmp_path / "example.yaml"
    path.write_text(
        (HERE / "config.example.yaml").read_text().replace("your-api-key-here", "0123456789abcdef")
    )
    return path


def test_example_config_is_valid_and_documents_every_key(tmp_path):
    with pytest.raises(jds.ConfigError, match=r"servers\[0\]\.api_key: still the example value"):
        jds.load_config(HERE / "config.example.yaml", {})
    cfg = jds.load_config(filled_example(tmp_path), {})
    assert len(cfg.servers) >= 2
    text = (HERE / "config.example.yaml").read_text()
    for section in (jds.SyncConfig, jds.UsersConfig):
        for f in jds.dataclasses.fields(section):
            assert f"{f.name}:" in text, f"config.example.yaml does not document {f.name}"
    for section in jds.SECTIONS:
        assert f"{section}:" in text
    for setting in jds.SETTINGS:
        assert f"{setting.key.rsplit('.', 1)[1]}:" in text, (
            f"config.example.yaml does not document {setting.key}"
        )


def test_every_setting_is_declared_once_in_the_table():
    import yaml

    # The table's default is the dataclasses' default, and every setting lands on the Config.
    config = jds.Config(servers=())
    for setting in jds.SETTINGS:
        section, _, name = setting.key.partition(".")
        holder = config if setting.attr else getattr(config, section)
        assert getattr(holder, setting.attr or name) == setting.default, setting.key
    # config.example.yaml shows the defaults the table has (where it sets the key).
    example = yaml.safe_load((HERE / "config.example.yaml").read_text())
    for setting in jds.SETTINGS:
        node: object = example
        for part in setting.key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and setting.kind not in ("list", "names", "urls"):
            assert node == setting.default, (setting.key, node, setting.default)
    # The README's table of environment variables is the table's, no more, no less.
    readme = (HERE / "README.md").read_text()
    table = readme[readme.index("### Environment variables") :].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(JDS_[A-Z_]+)`", table))
    declared = {s.env for s in jds.SETTINGS if s.env}
    assert listed - {v for v in listed if v.startswith("JDS_SERVER_")} == declared
    for setting in jds.SETTINGS:
        if setting.env:
            assert f"`{setting.key}`" in table or setting.key.startswith("server.auth"), setting.key
    # --help lists them too.
    out = run_cli("--help")
    assert all(v in out.stdout for v in declared) and "JDS_SERVER_<N>_API_KEY" in out.stdout


def start_setup_mode(
    path: Path, port: int, port_from_file: bool = False
) -> tuple[subprocess.Popen, str]:
    """The service started with no usable configuration at ``path``, and the one-time setup code
    from its log, as a person would read it there. The port from JDS_PORT, or from the file."""
    env = {"JDS_HOST": "127.0.0.1", **({} if port_from_file else {"JDS_PORT": str(port)})}
    proc = start_process(path, port, env=env)
    found = eventually(
        lambda: re.search(r"setup code is (\S+)", process_log(proc)), what="the setup code"
    )
    return proc, found.group(1)


def test_without_a_configuration_it_stays_up_in_setup_mode_and_saves_a_working_one(
    tmp_path, fake_servers
):
    home, parents = fakes = fake_servers(("home", "10.11.8"), ("parents", "10.10.7"))
    for f in fakes:
        f.add_user("alice")
        f.add_item("Heat", "Movie", "/media/movies/Heat (1995)/Heat.mkv")
    port = free_port()
    path = tmp_path / "config" / "config.yaml"
    proc, code = start_setup_mode(path, port)
    base = f"http://127.0.0.1:{port}"

    def call(method: str, route: str, body: dict | None = None, code_: str | None = code):
        conn = HTTPConnection("127.0.0.1", port, timeout=10)
        headers = {"Content-Type": "application/json", **({"X-Setup-Code": code_} if code_ else {})}
        conn.request(method, route, json.dumps(body) if body is not None else None, headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, json.loads(data) if data[:1] in (b"{", b"[") else data.decode()

    assert call("GET", "/healthz")[0] == 200, "up, never a restart loop"
    conn = HTTPConnection("127.0.0.1", port, timeout=10)
    for route, kind in (("/healthz", "text/plain"), ("/favicon.ico", "image/svg+xml")):
        conn.request("GET", route)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200 and resp.getheader("Content-Type").startswith(kind), (
            route,
            resp.getheaders(),
        )
    conn.close()
    status, ready = call("GET", "/readyz")
    assert status == 503 and ready["reasons"] == ["not configured"]
    assert call("GET", "/")[0] == 200 and not path.exists()
    server = {"name": "home", "url": home.url, "api_key": home.api_key}
    assert call("POST", "/api/setup/test", server, code_=None)[0] == 403
    assert call("POST", "/api/setup/test", server, code_="wrong")[0] == 403
    tested = call("POST", "/api/setup/test", server)[1]
    assert tested == {"ok": True, "name": "home", "version": "10.11.8", "users": 1}
    refused = call("POST", "/api/setup/test", {**server, "api_key": "wrong"})[1]
    assert refused["ok"] is False and "refused" in refused["error"]
    servers = [server, {"name": "parents", "url": parents.url, "api_key": parents.api_key}]
    bad = call("POST", "/api/setup/save", {"servers": servers, "webhook_token": "short"})
    assert bad[0] == 400 and "webhook_token" in bad[1]["error"] and not path.exists()
    saved = call("POST", "/api/setup/save", {"servers": servers})
    assert saved[0] == 200 and saved[1]["ok"], saved
    assert path.stat().st_mode & 0o777 == 0o600, "it holds API keys: its owner's only"
    assert jds.load_config(path, {}).servers[1].api_key == parents.api_key
    eventually(lambda: call("GET", "/readyz")[0] == 200, what="syncing started without a restart")
    home.webhook_url = f"{base}/webhook/home"
    home.user_marks("alice", "Heat", True)
    eventually(lambda: parents.ud("alice", "Heat")["Played"], what="a sync after the setup")
    shut_down(proc, [])
    assert proc.returncode == 0


def test_saving_from_setup_mode_keeps_the_file_and_what_the_page_does_not_show_and_starts_once(
    tmp_path, fake_servers
):
    import yaml

    home, parents = fakes = fake_servers("home", "parents")
    for f in fakes:
        f.add_user("alice")
        f.add_item("Heat", "Movie", "/media/movies/Heat (1995)/Heat.mkv")
    port = free_port()
    path = write_config(tmp_path, fakes, port=port)
    data = yaml.safe_load(path.read_text())
    data["server"].update(
        api_token="an-api-token-0123456789",
        auth={"username": "admin", "password": "a-long-password-1"},
        webhook_token="x" * 15,  # refused: too short, so the service starts in setup mode
    )
    data["database"]["path"] = str(tmp_path / "kept" / "history.db")
    original = yaml.safe_dump(data)
    path.write_text(original)
    # One mistake in the file (the token) does not move the setup page off the file's server.port.
    proc, code = start_setup_mode(path, port, port_from_file=True)
    svc = Running.of(port)  # the service is the process
    headers = {"Content-Type": "application/json", "X-Setup-Code": code}
    info = svc.call("GET", "/api/setup")[1]
    assert "webhook_token" in info["problem"] and info["config_path"] == str(path)
    servers = [{"name": f.name, "url": f.url, "api_key": f.api_key} for f in fakes]
    body = {"servers": servers, "webhook_token": "a-webhook-token-0123456789"}
    with ThreadPoolExecutor(4) as pool:  # four saves at once, as a double-clicking person makes
        answers = list(
            pool.map(lambda _: svc.call("POST", "/api/setup/save", body, headers), range(4))
        )
    assert sorted(a[0] for a in answers) == [200, 409, 409, 409], answers
    saved = yaml.safe_load(path.read_text())
    assert (
        saved["server"]["api_token"] == "an-api-token-0123456789"
        and saved["server"]["auth"]["username"] == "admin"
    )
    assert saved["database"]["path"] == str(tmp_path / "kept" / "history.db")
    assert (
        saved["server"]["webhook_token"] == "a-webhook-token-0123456789"
        and saved["servers"] == servers
    )
    (kept,) = tmp_path.glob("config.yaml.*.bak")
    assert kept.read_text() == original and kept.stat().st_mode & 0o777 == 0o600
    auth = {"Authorization": "Bearer an-api-token-0123456789"}
    eventually(lambda: svc.call("GET", "/readyz")[0] == 200, what="syncing started")
    assert (tmp_path / "kept" / "history.db").exists()
    assert svc.call("GET", "/api/status", headers=auth)[0] == 200
    shut_down(proc, [])
    text = process_log(proc)
    assert text.count("configuration saved") == 1 and text.count("starting to sync") == 1, text
    assert "an-api-token-0123456789" not in text and "a-long-password-1" not in text


def test_a_dry_run_says_so_at_start_and_in_each_pass_and_the_icon_is_served(tmp_path, fake_servers):
    fakes = fake_servers("home", "parents")
    for f in fakes:
        f.add_user("alice")
    port = free_port()
    proc = start_process(
        write_config(tmp_path, fakes, port=port), port, env={"JDS_DRY_RUN": "true"}
    )
    svc = Running.of(port, TEST_API_TOKEN)  # the service is the process; a script's token
    assert svc.call("POST", "/api/reconcile", {}, {"Sec-Fetch-Site": "same-origin"})[0] in (
        200,
        202,
    )
    eventually(
        lambda: "reconcile (dry run: sync.dry_run" in process_log(proc), 20, what="the pass's line"
    )
    conn = HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/favicon.ico")
    resp = conn.getresponse()
    assert (
        resp.status == 200
        and resp.getheader("Content-Type") == "image/svg+xml"
        and b"<svg" in resp.read()
    )
    conn.close()
    shut_down(proc, [])
    assert "dry run (sync.dry_run / JDS_DRY_RUN)" in process_log(proc)


def test_guessing_the_setup_code_makes_the_address_wait(tmp_path):
    port = free_port()
    proc, code = start_setup_mode(tmp_path / "config.yaml", port)
    svc = Running.of(port)  # the service is the process
    guess = {"Content-Type": "application/json", "X-Setup-Code": "0000-0000-0000"}
    assert [svc.call("POST", "/api/setup/test", {}, guess)[0] for _ in range(10)] == [403] * 10
    assert svc.call("POST", "/api/setup/test", {}, guess)[0] == 429
    right = {**guess, "X-Setup-Code": code}
    assert svc.call("POST", "/api/setup/test", {}, right)[0] == 429, (
        "a guess during the wait tells nothing"
    )
    shut_down(proc, [])
    assert code not in process_log(proc).split("the setup code is")[-1].split("\n", 1)[1]


def test_signed_in_the_setup_page_adds_a_server_later_and_it_syncs_without_a_restart(cluster):
    import yaml

    c = cluster(start=False, extra={"server": SIGN_IN})
    home, parents, public = c["home"], c["parents"], c["public"]
    data = yaml.safe_load(c.config_path.read_text())
    data["servers"] = [s for s in data["servers"] if s["name"] != "public"]  # two servers at first
    c.config_path.write_text(yaml.safe_dump(data))
    c.config = jds.load_config(c.config_path)
    c.start()
    svc = c.svc
    assert svc.call("GET", "/api/setup")[0] == 401, "signed in only"
    conn = HTTPConnection("127.0.0.1", svc.port, timeout=5)
    conn.request("POST", "/login", "username=admin&password=correct+horse", {"Content-Type": FORM})
    resp = conn.getresponse()
    resp.read()
    session = {
        "Cookie": resp.getheader("Set-Cookie").split(";")[0],
        "Sec-Fetch-Site": "same-origin",
    }
    info = svc.call("GET", "/api/setup", headers=session)[1]
    assert info["mode"] == "settings" and [s["name"] for s in info["servers"]] == [
        "home",
        "parents",
    ]
    assert home.api_key not in json.dumps(info) and info["set"]["auth"] is True, (
        "no key ever reaches the page"
    )
    json_session = {**session, "Content-Type": "application/json"}
    # The Test button, with the key left empty: the key that server has now.
    tested = svc.call("POST", "/api/setup/test", {"name": "home", "url": home.url}, json_session)[1]
    assert tested["ok"] is True, tested
    body = {
        "servers": [
            {"name": "home", "url": home.url},  # keys left empty: kept
            {"name": "parents", "url": parents.url},
            {"name": "public", "url": public.url, "api_key": public.api_key},  # the new one
        ]
    }
    empty = svc.call("POST", "/api/setup/save", {}, json_session)  # a save with no servers at all
    assert (
        empty[0] == 400
        and "at least one server" in empty[1]["error"]
        and not list(c.tmp.glob("*.bak"))
    )
    saved = svc.call("POST", "/api/setup/save", body, json_session)
    assert saved[0] == 200 and "without a restart" in saved[1]["message"], saved
    written = yaml.safe_load(c.config_path.read_text())
    assert [s.get("api_key") for s in written["servers"]] == [
        home.api_key,
        parents.api_key,
        public.api_key,
    ]
    assert written["server"]["auth"]["username"] == "admin", "what the page does not show is kept"
    assert len(list(c.config_path.parent.glob("config.yaml.*.bak"))) == 1
    assert svc.service.config.server("public") is not None, "the service in use has the new server"
    assert svc.call("GET", "/api/status", headers=session)[0] == 200, "still signed in, same port"
    public.webhook_url = f"{svc.url}/webhook/public"
    home.user_marks("alice", "Heat", True)
    eventually(lambda: public.ud("Alice", "Heat")["Played"], what="the new server gets the change")


def test_environment_variables_configure_everything_a_template_needs(tmp_path):
    secret = tmp_path / "key2"
    secret.write_text("key-two-from-a-docker-secret\n")
    env = {
        "JDS_SERVER_1_NAME": "lan",
        "JDS_SERVER_1_URL": "http://10.0.0.2:8096",
        "JDS_SERVER_1_API_KEY": "k1",
        "JDS_SERVER_1_PASSWORDLESS": "true",
        "JDS_SERVER_2_NAME": "wan",
        "JDS_SERVER_2_URL": "https://jf.example.com",
        "JDS_SERVER_2_API_KEY_FILE": str(secret),
        "JDS_PORT": "9090",
        "JDS_WEBHOOK_TOKEN": "shared-token-0123456789",
        "JDS_DATABASE_PATH": str(tmp_path / "x.db"),
        "JDS_LOG_LEVEL": "debug",
        "JDS_CPU": "Any",
        "JDS_SERVER_2_WEBHOOK_TOKEN": "wan-token-0123456789",
    }
    cfg = jds.load_config(tmp_path / "absent.yaml", env)
    assert [(s.name, s.url, s.api_key, s.passwordless) for s in cfg.servers] == [
        ("lan", "http://10.0.0.2:8096", "k1", True),
        ("wan", "https://jf.example.com", "key-two-from-a-docker-secret", False),
    ]
    assert (cfg.port, cfg.webhook_token, cfg.log_level, cfg.cpu) == (
        9090,
        "shared-token-0123456789",
        "DEBUG",
        "any",
    )
    assert (cfg.webhook_token_for("lan"), cfg.webhook_token_for("wan")) == (
        "shared-token-0123456789",
        "wan-token-0123456789",
    )
    # Merged over a file: the variable wins, the rest of the file stays.
    cfg = jds.load_config(
        filled_example(tmp_path), {"JDS_SERVER_2_URL": "http://other:8096", "JDS_PORT": "8181"}
    )
    assert (
        cfg.servers[1].url == "http://other:8096"
        and cfg.servers[1].name == "lan"
        and cfg.port == 8181
    )
    assert "environment" in cfg.source
    with pytest.raises(jds.ConfigError, match="JDS_PORT"):
        jds.load_config(filled_example(tmp_path), {"JDS_PORT": "eighty"})


def test_check_config_masks_secrets_and_tests_each_server(tmp_path, fake_servers):
    fakes = fake_servers(("home", "10.11.8"), ("parents", "12.0.0"))
    for f in fakes:
        f.add_user("alice")
    cfg = write_config(tmp_path, fakes)
    res = run_cli("--check-config", "--config", str(cfg))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "✓ home: Jellyfin 10.11.8" in res.stdout and "✓ parents: Jellyfin 12.0.0" in res.stdout
    for f in fakes:
        assert f.api_key not in res.stdout and f.api_key[-2:] in res.stdout
    fakes[1].api_key = "rotated"  # the configured key no longer works
    res = run_cli("--check-config", "--config", str(cfg))
    assert res.returncode == 1 and "✗ parents" in res.stdout and "refused" in res.stdout


# ── Dashboard ────────────────────────────────────────────────────────────────

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def test_dashboard_api_metrics_timeline_and_discard(cluster):
    c = cluster(max_retries=0)
    c["parents"].writes_fail = True  # it answers, but the write fails
    c["home"].user_marks("alice", "Heat", True)
    failed = eventually(lambda: c.svc.call("GET", "/api/events/failed")[1], what="a failed job")
    status, body = c.svc.call("POST", f"/api/events/{failed[0]['id']}/discard")
    assert status == 200 and body["success"]
    assert c.svc.call("GET", "/api/events/failed")[1] == []
    assert c.svc.call("POST", f"/api/events/{failed[0]['id']}/discard")[0] == 404
    c["parents"].writes_fail = False
    c.settle()
    tl = c.svc.call("GET", "/api/timeline?minutes=10")[1]
    assert sum(p["ok"] for p in tl["points"]) >= 1 and sum(p["failed"] for p in tl["points"]) >= 1
    assert c.svc.call("GET", "/api/timeline?minutes=x")[0] == 400
    conn = HTTPConnection("127.0.0.1", c.svc.port, timeout=5)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    text = resp.read().decode()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/plain")
    assert re.search(
        r'^jellyfin_db_sync_webhooks_received_total\{server="home",type="UserDataSaved"\} [1-9]',
        text,
        re.M,
    )
    assert re.search(
        r'^jellyfin_db_sync_sync_results_total\{target="public",result="ok"\} [1-9]', text, re.M
    )
    assert re.search(r'^jellyfin_db_sync_server_up\{server="parents"\} 1$', text, re.M)
    assert (
        "# TYPE jellyfin_db_sync_jobs gauge" in text
        and "jellyfin_db_sync_oldest_job_age_seconds" in text
    )
    # How long changes took to reach "public": a Prometheus histogram, cumulative up to +Inf =
    # count.
    bucket = r'^jellyfin_db_sync_sync_delay_seconds_bucket\{target="public",le="([^"]+)"\} (\d+)$'
    buckets = re.findall(bucket, text, re.M)
    counts = [int(n) for _le, n in buckets]
    count = int(
        re.search(
            r'^jellyfin_db_sync_sync_delay_seconds_count\{target="public"\} (\d+)$', text, re.M
        )[1]
    )
    assert [le for le, _n in buckets] == [*map(str, jds.DELAY_BUCKETS), "+Inf"]
    assert counts == sorted(counts) and counts[-1] == count >= 1
    assert counts[-2] == count, "a change within the hour"
    for f in c.fakes:
        assert f.api_key not in text
    page = c.svc.call("GET", "/")
    assert page[0] == 200 and "jellyfin-db-sync" in page[1]
    assert c.svc.call("GET", "/static/../jellyfin_db_sync.py")[0] in (403, 404)


# The words of the sync list whose letters a browser laid out on more than one line.
SPLIT_WORDS = """() => {
  const split = [];
  for (const td of document.querySelectorAll("#feed td")) {
    const walker = document.createTreeWalker(td, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      for (const m of node.data.matchAll(/\\S+/g)) {
        const range = document.createRange();
        range.setStart(node, m.index);
        range.setEnd(node, m.index + m[0].length);
        const lines = new Set([...range.getClientRects()].map((r) => Math.round(r.top)));
        if (lines.size > 1) split.push(m[0]);
      }
    }
  }
  return split;
}"""


def need_chromium() -> None:
    """Browser tests drive Debian's Chromium: skipped where it is missing, except in CI."""
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is missing: .ci/run installs it")
        pytest.skip("Debian's chromium is not installed")


def test_the_inspector_says_why_an_item_is_not_synced_and_syncs_it(cluster):
    c = cluster()
    home, parents, public = c["home"], c["parents"], c["public"]
    public.add_item(
        "Dune", "Movie", "/other/mount/Dune.mkv", provider_ids={"Tmdb": "438631"}
    )  # a second copy
    home.add_item(
        "Nope", "Movie", "/media/new/Nope.mkv", provider_ids={"Imdb": "tt10954984"}
    )  # home's alone
    for f in c.fakes:
        c.svc.service.library.refresh_index(f.name, full=True)
    quietly(
        home, "alice", "Dune", Played=True, PlayCount=2, LastPlayedDate=iso()
    )  # no webhook: not synced
    status, found = c.svc.call("GET", "/api/inspect?q=dune&person=Alice")
    assert status == 200 and found["item"]["name"] == "Dune" and found["person"] == "alice"
    by = {e["server"]: e for e in found["servers"]}
    assert (
        by["home"]["matched_by"] == "this item"
        and by["parents"]["matched_by"] == "same file (path)"
    )
    assert by["home"]["state"]["played"] and not by["parents"]["state"]["played"]
    assert "played" in found["different"] and "play_count" in found["different"]
    # Its rows and their words come with the answer, from the field registry (no second copy in
    # app.js).
    shown = {f["name"]: (f["label"], f["show"]) for f in found["fields"]}
    assert shown["favorite"] == ("favourite", "yes/no") and shown["position"] == (
        "position",
        "ticks",
    )
    assert shown["likes"] == ("rating", "like")  # three states: the page says liked or disliked
    assert shown["last_played"] == ("last played", "date") and "user_create" not in shown
    status, nope = c.svc.call("GET", "/api/inspect?q=nope&person=alice")
    missing = next(e for e in nope["servers"] if e["server"] == "parents")
    assert (
        not missing["found"]
        and "not found on parents" in missing["matched_by"]
        and "imdb tt10954984" in missing["matched_by"]
    )
    # "Sync this item now": read everywhere, queue what differs, through the normal rules.
    status, done = c.svc.call(
        "POST",
        "/api/inspect/sync",
        {"item": found["item"]["id"], "person": "alice"},
        {"Content-Type": "application/json"},
    )
    assert status == 200 and done["queued"] >= 2, done
    eventually(
        lambda: parents.ud("alice", "Dune")["Played"] and public.ud("Alice", "Dune")["Played"],
        what="the item synced",
    )
    c.settle()
    after = c.svc.call("GET", "/api/inspect?q=dune&person=alice")[1]
    assert "played" not in after["different"]
    assert any(e["result"] == "ok" for e in after["recent"])


def test_the_dashboard_needs_one_request_per_refresh(cluster):
    c = cluster()
    c["home"].user_marks("alice", "Heat", True)
    c.settle()
    status, d = c.svc.call("GET", "/api/dashboard?limit=5&username=ali&minutes=60")
    assert status == 200 and set(d) == {
        "status",
        "timeline",
        "hourly",
        "log",
        "waiting",
        "failed",
        "users",
        "reconcile",
        "held",
        "alerts",
        "words",
    }
    assert d["status"]["version"] == jds.__version__ and d["timeline"]["minutes"] == 60
    # The charts: per minute over the last hour, per hour over the last 24 hours, by result.
    assert (d["timeline"]["bucket"], d["hourly"]["bucket"], d["hourly"]["minutes"]) == (
        60,
        3600,
        1440,
    )
    assert (
        sum(p["ok"] for p in d["hourly"]["points"])
        == sum(p["ok"] for p in d["timeline"]["points"])
        >= 2
    )
    assert d["log"]["limit"] == 5 and all("ali" in e["username"] for e in d["log"]["entries"])
    assert any(e["item_name"].startswith("Heat") for e in d["log"]["entries"])
    app = (HERE / "static" / "app.js").read_text()
    assert (
        app.count("api(`/api/dashboard") == 1
        and "/api/status" not in app.split("async function refresh")[1]
    )
    assert "visibilityState" in app, "a hidden tab asks for nothing"


SIGN_IN = {
    "auth": {"username": "admin", "password": "correct horse"}
}  # the dashboard changes things


def signed_in(c: Cluster) -> None:
    """The dashboard's buttons need a sign-in (issue 22.1): server.auth is set, and the test's
    own calls send the API token, as a script would."""
    c.svc.script_token = c.config.api_token


def sign_in(page, url: str) -> None:
    """Open the dashboard and sign in on its page, as a person would."""
    page.goto(url + "/")
    page.get_by_label("User name").fill("admin")
    page.get_by_label("Password").fill("correct horse")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(url + "/")


@pytest.mark.browser
def test_browser_dashboard_shows_syncs_live_and_retries_a_failed_job(cluster, tmp_path):
    need_chromium()
    from playwright.sync_api import expect, sync_playwright

    c = cluster(max_retries=0, extra={"server": SIGN_IN})
    signed_in(c)
    home, parents = c["home"], c["parents"]
    for f in c.fakes:  # an episode, to be named the way people know it
        show = f.add_item("Lost", "Series", "/media/tv/Lost", provider_ids={"Tvdb": "73739"})
        f.add_item(
            "Pilot", "Episode", "/media/tv/Lost/S01E01.mkv", series_id=show, season=1, episode=1
        )
        c.svc.service.library.refresh_index(f.name)
    # The README's screenshots are refreshed only when asked (REFRESH_DOCS=1).
    shots = HERE / "docs" if os.environ.get("REFRESH_DOCS") else tmp_path
    shots.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        sign_in(page, c.svc.url)
        expect(page.get_by_role("article", name="server home")).to_contain_text(
            "reachable", timeout=10000
        )
        expect(page.locator("#feed-empty")).to_contain_text("No changes synced yet")
        # A change on one server shows up in the feed without a reload.
        home.user_marks("alice", "Arrival", True)
        expect(page.locator("#feed tbody")).to_contain_text("Arrival", timeout=10000)
        expect(page.locator("#feed tbody tr").first).to_contain_text("written")
        home.user_marks("bob", "Pilot", True)
        expect(page.locator("#feed tbody")).to_contain_text("Show — S01E01 — Pilot", timeout=10000)
        # A server that refuses writes: the click shows as one row (the favourite, and the rating
        # it reported) with its reason; "Retry now" makes it go through.
        parents.writes_fail = True
        home.user_favourites("bob", "Dune", True)
        row = (
            page.locator("#problems tbody tr", has_text="Dune")
            .filter(has_text="parents")
            .filter(has_text="favourite")
        )
        expect(row.first).to_contain_text("HTTP 503", timeout=10000)
        expect(row).to_have_count(1)
        parents.writes_fail = False
        row.first.get_by_role("button", name=re.compile("Retry")).click()
        eventually(lambda: parents.ud("bob", "Dune")["IsFavorite"], what="the retried job")
        expect(row).to_have_count(0, timeout=10000)
        expect(page.locator("#problems-empty")).to_be_visible(timeout=10000)
        expect(page.locator("#feed tbody")).to_contain_text("favourite", timeout=10000)
        page.locator("#f-user").fill("bob")
        expect(page.locator("#feed tbody tr").first).to_contain_text("bob")
        page.locator("#f-user").fill("")
        # Reconciliation from the page: a dry run reports, changes nothing.
        with home.lock:
            home.ud("bob", "Heat")["IsFavorite"] = True  # a change no webhook reported
        page.get_by_role("button", name="Dry run (change nothing)").click()
        expect(page.locator("#rec-report")).to_contain_text("Last dry run", timeout=15000)
        expect(page.locator("#rec-report")).to_contain_text("favourite 'Heat' (from home)")
        assert not parents.ud("bob", "Heat")["IsFavorite"]
        page.get_by_role("button", name="Run now").click()
        eventually(
            lambda: parents.ud("bob", "Heat")["IsFavorite"], 15, what="the reconciled favourite"
        )
        expect(page.locator("#rec-report")).to_contain_text("Last run", timeout=10000)
        expect(page.locator("#rec-report")).to_contain_text("Last dry run")
        # "Why isn't this synced?": a difference no webhook reported, shown and then fixed.
        quietly(home, "alice", "Dune", IsFavorite=True)
        page.get_by_label("Title").fill("Dune")
        page.get_by_label("Person").fill("alice")
        page.get_by_role("button", name="Look").click()
        expect(page.locator("#inspection tr.differs")).to_contain_text("favourite ≠", timeout=10000)
        expect(page.locator("#inspection")).to_contain_text("same file (path)")
        page.once("dialog", lambda dialog: dialog.accept())
        page.get_by_role("button", name="Sync this item now").click()
        eventually(
            lambda: parents.ud("alice", "Dune")["IsFavorite"], 15, what="the inspector's sync"
        )
        c.settle()
        page.get_by_role("button", name="Look").click()
        expect(page.locator("#inspection")).to_contain_text("same file (path)", timeout=10000)
        expect(page.locator("#inspection tr.differs")).to_have_count(0, timeout=10000)
        # The charts have axes, bars stacked by result, and a legend.
        assert (
            page.locator("#chart rect.ok").count() >= 1
            and page.locator("#chart-day rect.ok").count() >= 1
        )
        expect(page.locator("#chart-day")).to_contain_text("24 h ago")
        expect(page.locator(".legend")).to_contain_text("written")
        page.wait_for_timeout(2500)  # one more refresh, for a settled picture
        assert page.evaluate(SPLIT_WORDS) == [], "no word in the sync list is broken across lines"
        page.screenshot(path=str(shots / "dashboard-desktop.png"), full_page=True)
        phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
        sign_in(phone, c.svc.url)
        expect(phone.locator("#feed tbody")).to_contain_text("Arrival", timeout=10000)
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390 + 1, (
            "no sideways scrolling"
        )
        assert phone.evaluate(SPLIT_WORDS) == [], "on a phone too, no word is broken across lines"
        card = phone.locator("#feed tbody tr").first
        assert card.evaluate("tr => getComputedStyle(tr).display") == "block", "one card per change"
        phone.screenshot(path=str(shots / "dashboard-phone.png"), full_page=True)
        browser.close()


@pytest.mark.browser
def test_browser_held_changes_undo_preview_and_a_test_alert(cluster, receiver, tmp_path):
    need_chromium()
    from playwright.sync_api import expect, sync_playwright

    c = cluster(
        start=False,
        extra={
            "server": SIGN_IN,
            "safety": {"brake_items": 20},
            "alerts": {"urls": [f"{receiver.url}/hook"]},
        },
    )
    for f in c.fakes:
        f.add_library(60)
    names = [f"Film {i}" for i in range(60)]
    films_played_everywhere(c, "alice", names)
    c.start()
    signed_in(c)
    reconcile(c)
    for n in names:  # parents comes back from an old backup: nothing played
        quietly(c["parents"], "alice", n, Played=False, PlayCount=0, LastPlayedDate=None)
    reconcile(c)
    c["home"].user_favourites("bob", "Heat", True)  # and a change that went through, to undo
    eventually(lambda: c["public"].ud("bob", "Heat")["IsFavorite"])
    c.settle()
    shots = HERE / "docs" if os.environ.get("REFRESH_DOCS") else tmp_path
    shots.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.on("dialog", lambda dialog: dialog.accept())
        sign_in(page, c.svc.url)
        held_card = page.locator("#held article")
        expect(held_card).to_contain_text(
            "held: 60 changes from parents for alice: 60 unplayed", timeout=10000
        )
        expect(held_card).to_contain_text("unplayed: Film")
        page.wait_for_timeout(300)
        page.locator("#held-section").screenshot(path=str(shots / "held-changes.png"))
        # Undo everything one webhook caused, from its row: a preview first, then the undo.
        row = page.locator("#feed tbody tr", has_text="Heat").filter(has_text="favourite").first
        row.get_by_role("button", name="Undo all").click()
        preview = page.locator("#undo-preview")
        expect(preview).to_contain_text("2 value(s) to put back", timeout=10000)
        expect(preview.locator("article", has_text="public")).to_contain_text(
            "favourite → not favourite"
        )
        page.wait_for_timeout(300)
        preview.screenshot(path=str(shots / "undo-preview.png"))
        assert c["public"].ud("bob", "Heat")["IsFavorite"], "a preview changes nothing"
        preview.get_by_role("button", name="Undo 2 change(s)").click()
        expect(preview).to_contain_text("queued to be put back", timeout=10000)
        eventually(lambda: not c["public"].ud("bob", "Heat")["IsFavorite"], what="the undo")
        assert c["home"].ud("bob", "Heat")["IsFavorite"]
        # Discard the held changes: parents is put back, nothing spread.
        held_card.get_by_role("button", name="Discard").click()
        expect(page.locator("#held-section")).to_be_hidden(timeout=10000)
        eventually(
            lambda: all(c["parents"].ud("alice", n)["Played"] for n in names),
            20,
            what="parents put back",
        )
        assert all(c["home"].ud("alice", n)["Played"] for n in names)
        page.get_by_role("button", name="Send test").click()
        eventually(
            lambda: [b for b in receiver.bodies("/hook") if b["condition"] == "test"],
            what="the test alert",
        )
        expect(page.locator("#alerts")).to_contain_text("test alert", timeout=10000)
        assert "/hook" not in page.locator("#alerts").inner_text(), (
            "an alert URL is shown without its path"
        )
        browser.close()


@pytest.mark.browser
def test_browser_setup_page_tests_a_server_and_saves(tmp_path, fake_servers):
    need_chromium()
    from playwright.sync_api import expect, sync_playwright

    home, parents = fake_servers(("home", "10.11.8"), ("parents", "12.0.0"))
    port = free_port()
    path = tmp_path / "config.yaml"
    proc, code = start_setup_mode(path, port)
    shots = HERE / "docs" if os.environ.get("REFRESH_DOCS") else tmp_path
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"http://127.0.0.1:{port}/")
        page.get_by_label("Setup code").fill(code)
        rows = page.locator("fieldset.server")
        for row, fake in zip((rows.nth(0), rows.nth(1)), (home, parents), strict=True):
            row.get_by_label("Name (part of its webhook URL)").fill(fake.name)
            row.get_by_label("URL", exact=True).fill(fake.url)
            row.get_by_label("API key").fill(fake.api_key)
        rows.nth(0).get_by_role("button", name="Test").click()
        expect(rows.nth(0).get_by_role("status")).to_contain_text(
            "✓ home: Jellyfin 10.11.8", timeout=10000
        )
        page.screenshot(path=str(shots / "setup.png"), full_page=True)
        page.get_by_role("button", name="Save and start syncing").click()
        expect(page.get_by_role("status").last).to_contain_text(
            "syncing has started", timeout=10000
        )
        # The page then opens the dashboard, served by the service now running.
        expect(page).to_have_title("jellyfin-db-sync", timeout=10000)
        expect(page.get_by_role("article", name="server home")).to_be_visible(timeout=10000)
        browser.close()
    assert path.exists() and jds.load_config(path, {}).servers[0].name == "home"
    shut_down(proc, [])


# ── Packaging: Docker, unRAID, TrueNAS ───────────────────────────────────────


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (HERE / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def known_env_var(name: str) -> bool:
    return (
        name in jds.ENV_SETTINGS
        or bool(jds._SERVER_ENV.match(name))
        or name in ("TZ", "CONFIG_PATH")
    )


def test_dockerfile_runs_unprivileged_with_volumes_and_a_stdlib_healthcheck(tmp_path, fake_servers):
    ins = dict(dockerfile_instructions())
    assert ins["FROM"].startswith("python:3.1") and "slim" in ins["FROM"]
    # Not root for long: started as root it gives /config and /data to PUID:PGID and runs as that
    # user (test_puid_and_pgid_…); started with --user it runs as that user from the start.
    env = dict(re.findall(r"(\w+)=(\S+)", ins["ENV"]))
    assert env["PUID"] == "1000" and env["PGID"] == "1000" and "USER" not in ins
    assert ins["EXPOSE"] == "8080" and json.loads(ins["VOLUME"]) == ["/config", "/data"]
    assert json.loads(ins["ENTRYPOINT"])[0] == "python"  # exec form: Python is PID 1, gets SIGTERM
    # Run as a module: Python keeps a script's parse tree for as long as it runs (the README says
    # why).
    assert json.loads(ins["ENTRYPOINT"])[1:] == ["-m", "jellyfin_db_sync"]
    assert "PYTHONPATH=/app" in ins["ENV"]
    assert ("RUN", "python -m compileall -q jellyfin_db_sync.py") in dockerfile_instructions()
    for line in (v for k, v in dockerfile_instructions() if k == "COPY"):
        for src in line.split()[:-1]:
            assert (HERE / src).exists(), f"Dockerfile copies {src}, which does not exist"
    # The HEALTHCHECK command, run as Docker would (with PYTHONPATH=/app: here, this folder),
    # against a live instance whose port is set by JDS_PORT, and by the config file alone.
    cmd = json.loads(ins["HEALTHCHECK"].split(" CMD ", 1)[1])
    cmd[0] = sys.executable if cmd[0] == "python" else cmd[0]
    fakes = fake_servers("home", "parents")
    port = free_port()
    cfg = write_config(tmp_path, fakes, port=port)
    proc = start_process(cfg, port)
    bare = {k: v for k, v in os.environ.items() if not k.startswith("JDS_")} | {
        "PYTHONPATH": str(HERE)
    }
    try:
        by_variable = subprocess.run(
            cmd,
            env={**bare, "JDS_PORT": str(port), "CONFIG_PATH": str(tmp_path / "none.yaml")},
            timeout=10,
            check=False,
        )
        by_file = subprocess.run(
            cmd, env={**bare, "CONFIG_PATH": str(cfg)}, timeout=10, check=False
        )
        assert (by_variable.returncode, by_file.returncode) == (0, 0)
    finally:
        shut_down(proc, fakes)
    down = subprocess.run(
        cmd, env={**bare, "CONFIG_PATH": str(cfg)}, timeout=10, check=False, capture_output=True
    )
    assert down.returncode == 1


def test_unraid_template_is_valid_and_uses_only_variables_the_program_reads():
    import xml.etree.ElementTree as ET

    root = ET.parse(HERE / "deploy" / "unraid-jellyfin-db-sync.xml").getroot()
    assert root.tag == "Container" and root.get("version") == "2"
    for tag in ("Name", "Repository", "Support", "Project", "Overview", "WebUI", "Category"):
        assert (root.findtext(tag) or "").strip(), f"missing <{tag}>"
    for bloat in ("DateInstalled", "Networking", "Data", "Environment"):
        assert root.find(bloat) is None
    configs = root.findall("Config")
    ports = {c.get("Target") for c in configs if c.get("Type") == "Port"}
    assert re.search(r"\[PORT:(\d+)\]", root.findtext("WebUI")).group(1) in ports
    paths = {c.get("Target") for c in configs if c.get("Type") == "Path"}
    assert paths == {"/config", "/data"}
    variables = {c.get("Target"): c for c in configs if c.get("Type") == "Variable"}
    for name, c in variables.items():
        assert known_env_var(name), f"{name} is not read by jellyfin_db_sync.py"
        assert c.get("Display") in ("always", "advanced") and c.get("Description")
        if "KEY" in name or "TOKEN" in name:
            assert c.get("Mask") == "true", f"{name} must be masked"
    for n in (1, 2):
        for field in ("NAME", "URL", "API_KEY"):
            assert f"JDS_SERVER_{n}_{field}" in variables


def test_truenas_compose_file_is_valid_and_uses_only_variables_the_program_reads(tmp_path):
    import yaml

    data = yaml.safe_load((HERE / "deploy" / "docker-compose.yaml").read_text())
    svc = data["services"]["jellyfin-db-sync"]
    assert re.fullmatch(r"\d+:\d+", svc["user"]) and svc["restart"] == "unless-stopped"
    host_port, container_port = svc["ports"][0].split(":")
    assert container_port == "8080" and data["x-portals"][0]["port"] == int(host_port)
    assert {v.split(":")[1] for v in svc["volumes"]} == {"/config", "/data"}
    env = {k: str(v) for k, v in svc["environment"].items()}
    assert all(known_env_var(k) for k in env), [k for k in env if not known_env_var(k)]
    # Filled in, the environment alone is a working configuration.
    env.update(JDS_SERVER_1_API_KEY="k1", JDS_SERVER_2_API_KEY="k2")
    cfg = jds.load_config(tmp_path / "none.yaml", env)
    assert [s.name for s in cfg.servers] == ["home", "remote"]


def test_the_deploy_files_the_readme_and_the_dockerfile_name_one_image_one_port_one_license():
    import xml.etree.ElementTree as ET

    import yaml

    image = "ghcr.io/jellyfin-db-sync/jellyfin-db-sync"
    port = str(jds.SETTING["server.port"].default)
    unraid = ET.parse(HERE / "deploy" / "unraid-jellyfin-db-sync.xml").getroot()
    compose = yaml.safe_load((HERE / "deploy" / "docker-compose.yaml").read_text())["services"][
        "jellyfin-db-sync"
    ]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme, dockerfile = (HERE / "README.md").read_text(), (HERE / "Dockerfile").read_text()
    images = {
        "unRAID": unraid.findtext("Repository").rpartition(":")[0],
        "compose": compose["image"].rpartition(":")[0],
        "Helm": values["image"]["repository"],
        "README": re.search(r"(ghcr\.io/\S+?):latest", readme).group(1),
        "Dockerfile": re.search(r"publishes: (ghcr\.io/\S+?)\)", dockerfile).group(1),
    }
    assert set(images.values()) == {image}, images
    port_config = next(c for c in unraid.findall("Config") if c.get("Type") == "Port")
    ports = {
        "unRAID": {port_config.get("Target"), port_config.get("Default"), port_config.text},
        "compose": set(compose["ports"][0].split(":")),
        "Helm": {str(values["service"]["port"]), str(values["service"]["targetPort"])},
        "Dockerfile": set(re.findall(r"^EXPOSE (\d+)", dockerfile, re.M)),
        "README": set(re.findall(r"-p (\d+):(\d+) \\", readme)[0]),
    }
    assert all(p == {port} for p in ports.values()), ports
    for path in (*(HERE / "deploy").rglob("*"), HERE / "README.md", HERE / "Dockerfile"):
        if path.is_file() and path.suffix != ".svg":
            assert "OWNER" not in path.read_text(), f"{path}: a placeholder a pull fails on"
    label = re.search(r'org\.opencontainers\.image\.licenses="([^"]+)"', dockerfile).group(1)
    assert (HERE / "LICENSE").read_text().startswith(f"{label} License")


CHART = HERE / "deploy" / "helm" / "jellyfin-db-sync"


def test_helm_chart_uses_only_values_it_declares_and_variables_the_program_reads():
    # There is no helm binary here: what can be checked without one, is.
    import yaml

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "jellyfin-db-sync"
    assert chart["appVersion"] == jds.__version__
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    # The older chart's values are all there (docs/older-program.md), so its users' values files
    # fit.
    older = (
        "replicaCount image.repository image.tag image.pullPolicy imagePullSecrets nameOverride "
        "fullnameOverride "
        "serviceAccount podAnnotations podLabels podSecurityContext securityContext service.type "
        "service.port "
        "ingress resources livenessProbe readinessProbe autoscaling nodeSelector tolerations "
        "affinity persistence "
        "extraVolumes extraVolumeMounts extraEnv extraEnvFrom config serviceMonitor "
        "podDisruptionBudget "
        "initContainers sidecarContainers"
    ).split()
    templates = {p.name: p.read_text() for p in (CHART / "templates").iterdir()}
    text = "\n".join(templates.values())

    def lookup(path: str) -> object:
        node: object = values
        for part in path.split("."):
            assert isinstance(node, dict) and part in node, f"values.yaml has no {path}"
            node = node[part]
        return node

    for path in older:
        lookup(path)
    for path in set(re.findall(r"\.Values\.([A-Za-z0-9_.]+)", text)):
        lookup(path)
    # Non-root, read-only root filesystem, one writer, probes on /healthz and /readyz.
    assert (
        values["securityContext"]["readOnlyRootFilesystem"] is True
        and values["podSecurityContext"]["runAsNonRoot"]
    )
    deployment = templates["deployment.yaml"]
    assert "replicas: 1" in deployment and "type: Recreate" in deployment
    assert values["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert values["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert "replicaCount" in templates["NOTES.txt"] and "ignored" in templates["NOTES.txt"]
    # Every environment variable it sets is one the program reads.
    names = re.findall(
        r"- name: ((?:JDS_|CONFIG_)(?:[A-Z0-9_]|\{\{[^}]*\}\})+)\s*$", deployment, re.M
    )
    assert "JDS_SERVER_{{ add $i 1 }}_API_KEY_FILE" in names and "JDS_WEBHOOK_TOKEN_FILE" in names
    for name in names:
        concrete = re.sub(r"\{\{[^}]*\}\}", "1", name)
        base = concrete[:-5] if concrete.endswith("_FILE") else concrete
        assert known_env_var(base), name
    # The config file it renders uses keys the program knows.
    rendered = templates["configmap.yaml"].split("config.yaml: |", 1)[1]
    section = None
    for line in rendered.splitlines():
        m = re.match(r"^    (\w+):\s*$", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r"^      (\w+): \{\{", line)
        if m and section != "path_sync_policy":
            assert f"{section}.{m.group(1)}" in jds.SETTING, f"{section}.{m.group(1)}"


# ── Process life: SIGTERM and SIGKILL ────────────────────────────────────────


STARTED: list[subprocess.Popen] = []  # service processes started by the running test


@pytest.fixture(autouse=True)
def stop_started_processes():
    """Every process a test starts is stopped when it ends, pass or fail: a failed assertion
    must not leave a service running (and holding its port) behind it."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.log_path.unlink(missing_ok=True)  # type: ignore[attr-defined]


def shut_down(proc: subprocess.Popen, fakes: list[FakeJellyfin]) -> None:
    """Stop the service as Docker would (SIGTERM) and the fake servers."""
    proc.send_signal(signal.SIGTERM)
    proc.wait(15)
    for f in fakes:
        f.close()


def start_process(
    config_path: Path,
    port: int,
    program: list[str] | None = None,
    env: dict | None = None,
    preexec_fn=None,
) -> subprocess.Popen:
    """The service as a separate process (``program``: the interpreter and script to run), once
    it answers /healthz."""
    program = program or [
        sys.executable,
        "-m",
        "jellyfin_db_sync",
    ]  # as the README and the image run it
    # Its log goes to a file, as Docker's does: a pipe nobody reads fills up, and a service
    # blocked writing its log answers nothing (a benchmark once mistook that for a hang).
    log_file = Path(tempfile.mkstemp(prefix="jds-log-", suffix=".txt")[1])
    with log_file.open("w") as out:
        proc = subprocess.Popen(
            [*program, "--config", str(config_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=HERE,
            preexec_fn=preexec_fn,  # noqa: PLW1509 - sets a limit, nothing that could deadlock
        )
    proc.log_path = log_file  # type: ignore[attr-defined]
    STARTED.append(
        proc
    )  # stopped by the stop_started_processes fixture, whatever the test's outcome

    def up():
        try:
            conn = HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/healthz")
            return conn.getresponse().status == 200
        except OSError:
            return proc.poll() is not None

    eventually(up, 15, 0.05, "the service to start")
    assert proc.poll() is None, process_log(proc)
    return proc


def process_log(proc: subprocess.Popen) -> str:
    """What a process started by start_process has logged so far."""
    return proc.log_path.read_text(errors="replace")  # type: ignore[attr-defined]


def test_a_renamed_copy_runs_as_one_file_and_shows_as_itself_in_ps(tmp_path, fake_servers):
    # NAS owners copy the file anywhere, under any name, and run it with their own interpreter
    # options; ps (and a process manager) must show exactly what they started.
    folder = tmp_path / "my sync's copy"
    folder.mkdir()
    script = folder / "sync-v1.py"
    script.write_bytes((HERE / "jellyfin_db_sync.py").read_bytes())
    python = [sys.executable, "-X", "utf8", str(script)]
    out = subprocess.run([*python, "--version"], check=False, capture_output=True, text=True)
    assert (out.returncode, out.stdout.strip()) == (0, f"jellyfin-db-sync {jds.__version__}"), (
        out.stderr
    )
    fakes = fake_servers("home", "parents")
    port = free_port()
    cfg = write_config(tmp_path, fakes, port=port)
    proc = start_process(cfg, port, python)
    try:
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[1:] == [
            b"-X",
            b"utf8",
            str(script).encode(),
            b"--config",
            str(cfg).encode(),
            b"",
        ], cmdline
    finally:
        shut_down(proc, fakes)
    assert proc.returncode == 0


def test_the_service_keeps_to_one_cpu_unless_told_otherwise(tmp_path, fake_servers):
    # Python runs one thread at a time: every thread of the service stays on one CPU (the last
    # it may use), which costs less CPU per webhook than handing the GIL between CPUs.
    import yaml

    allowed = sorted(os.sched_getaffinity(0))
    fakes = fake_servers("home", "parents")
    for setting, expected in (
        ("auto", {allowed[-1]} if len(allowed) > 1 else set(allowed)),
        ("any", set(allowed)),
        (str(allowed[0]), {allowed[0]}),
    ):
        port = free_port()
        folder = tmp_path / setting
        folder.mkdir()
        cfg = write_config(folder, fakes, port=port)
        data = yaml.safe_load(cfg.read_text())
        data["server"]["cpu"] = setting
        cfg.write_text(yaml.safe_dump(data))
        proc = start_process(cfg, port)
        try:
            for task in Path(f"/proc/{proc.pid}/task").iterdir():
                cpus = re.search(
                    r"Cpus_allowed_list:\s*(\S+)", (task / "status").read_text()
                ).group(1)
                assert set(expand_cpu_list(cpus)) == expected, (setting, task.name, cpus)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)


def expand_cpu_list(text: str) -> list[int]:
    """'0-2,5' → [0, 1, 2, 5] (the kernel's notation in /proc/*/status)."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def test_a_clean_start_says_where_to_point_the_plugin_and_prints_no_traceback(
    tmp_path, fake_servers
):
    fakes = fake_servers("home", "parents")
    port = free_port()
    proc = start_process(write_config(tmp_path, fakes, port=port), port)
    shut_down(proc, [])
    log_text = process_log(proc)
    assert "Traceback" not in log_text and "Logging error" not in log_text, log_text
    start = next(line for line in log_text.splitlines() if "listening on" in line)
    assert jds.__version__ in start and f"127.0.0.1:{port}" in start
    for f in fakes:
        assert f"http://127.0.0.1:{port}/webhook/{f.name}" in start, start


def test_an_unwritable_data_folder_is_named_with_the_user_and_the_fix(
    tmp_path, fake_servers, monkeypatch, capsys
):
    import yaml

    # The tests run as root, whom no permission stops: the kernel's answer for another user is
    # given by os.access, as it would be for uid 1000 and a folder Docker created as root.
    locked = tmp_path / "data"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        jds.os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode)
    )
    monkeypatch.setattr(jds.os, "getuid", lambda: 1000)
    monkeypatch.setattr(jds.os, "getgid", lambda: 1000)
    cfg = write_config(tmp_path, fake_servers("home", "parents"))
    data = yaml.safe_load(cfg.read_text())
    data["database"]["path"] = str(locked / "sync.db")
    cfg.write_text(yaml.safe_dump(data))
    assert jds.main(["--check-config", "--config", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert "✗ database" in out and "uid 1000" in out and f"sudo chown -R 1000:1000 {locked}" in out
    with pytest.raises(jds.StoreError) as refused:
        jds.Store(str(locked / "sync.db"))
    assert "uid 1000" in str(refused.value) and "chown" in str(refused.value)
    assert "not a usable SQLite database" not in str(refused.value)
    assert not any(locked.iterdir()), "nothing was written"


def test_puid_and_pgid_give_what_is_ours_to_that_user_and_run_as_it(fake_servers):
    # As the image does when started as root with PUID/PGID (the linuxserver way). In a folder
    # of its own: pytest's temporary folders are root's alone, which that user could not enter.
    import yaml

    top = Path(tempfile.mkdtemp(prefix="jds-puid-"))
    try:
        top.chmod(0o755)
        config_dir, share = top / "config", top / "share"
        config_dir.mkdir()
        share.mkdir()
        share.chmod(0o777)  # a shared folder anyone may write, holding others' files
        (share / "photos").mkdir()
        (share / "photos" / "a.jpg").write_text("someone else's")
        (share / "notes.txt").write_text("someone else's")
        database = share / "jds" / "sync.db"  # a folder of ours, made by the start, in the share
        cfg = write_config(config_dir, fake_servers("home", "parents"))
        data = yaml.safe_load(cfg.read_text())
        data["database"]["path"] = str(database)
        cfg.write_text(yaml.safe_dump(data))
        probe = (
            "import os, sys, jellyfin_db_sync as j;"
            f"print(j.drop_privileges({str(cfg)!r}, dict(os.environ)));"
            f"j.Store({str(database)!r}).close();"
            "print(os.getuid(), os.getgid(), oct(os.umask(0)))"
        )
        env = {
            **os.environ,
            "PUID": "65534",
            "PGID": "65533",
            "UMASK": "027",
            "PYTHONPATH": str(HERE),
        }
        out = subprocess.run(
            [sys.executable, "-c", probe],
            env=env,
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        said, ids = out.stdout.strip().splitlines()
        assert "running as 65534:65533" in said and ids == "65534 65533 0o27"
        assert str(cfg) in said and str(database.parent) in said, "the log says what was given"
        for path in (config_dir, cfg, database.parent, database):
            assert (path.stat().st_uid, path.stat().st_gid) == (65534, 65533), path
        for path in (share, share / "photos", share / "photos" / "a.jpg", share / "notes.txt"):
            assert (path.stat().st_uid, path.stat().st_gid) == (0, 0), (
                f"{path} is not ours: left alone"
            )
        # Without PUID nothing changes (started with --user, or not in Docker at all).
        env.pop("PUID")
        out = subprocess.run(
            [sys.executable, "-c", probe],
            env=env,
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert out.stdout.splitlines()[0] == "None"
    finally:
        subprocess.run(["rm", "-rf", str(top)], check=False)


def test_check_config_writes_nothing_and_variables_cannot_hurt(tmp_path):
    missing = tmp_path / "typo" / "config.yaml"
    res = run_cli("--check-config", "--config", str(missing))
    assert res.returncode == 2 and "no configuration" in res.stderr and not missing.parent.exists()
    # An empty variable is "not set": it never erases what the file says.
    cfg = jds.load_config(
        filled_example(tmp_path), {"JDS_WEBHOOK_TOKEN": "", "JDS_PORT": " ", "JDS_SERVER_1_URL": ""}
    )
    assert cfg.port == 8080 and cfg.servers[0].url.startswith("https://")
    # A misspelt variable is a warning naming the right one; a missing server field names its
    # variable.
    cfg = jds.load_config(filled_example(tmp_path), {"JDS_WEBHOK_TOKEN": "x" * 20})
    assert any(
        "JDS_WEBHOK_TOKEN" in w and "did you mean JDS_WEBHOOK_TOKEN?" in w for w in cfg.warnings
    )
    env = {"JDS_SERVER_1_NAME": "a", "JDS_SERVER_1_URL": "http://a:1", "JDS_SERVER_1_API_KEY": ""}
    with pytest.raises(jds.ConfigError, match="JDS_SERVER_1_API_KEY"):
        jds.load_config(tmp_path / "absent.yaml", env)


def test_sigterm_stops_cleanly_within_ten_seconds(tmp_path, fake_servers):
    fakes = fake_servers("home", "parents")
    port = free_port()
    cfg = write_config(tmp_path, fakes, port=port)
    proc = start_process(cfg, port)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert time.monotonic() - started < 10


@pytest.mark.slow
def test_five_kills_during_bursts_lose_no_acknowledged_event(tmp_path, fake_servers):
    fakes = fake_servers("home", "parents")
    home, parents = fakes
    for f in fakes:
        f.add_user("alice")
        for i in range(150):
            f.add_item(f"Film {i}", "Movie", f"/media/movies/Film {i}.mkv")
    port = free_port()
    cfg = write_config(tmp_path, fakes, port=port)
    uid = home.user("alice")
    acked: list[str] = []
    # Parents half of the time "down", so that acknowledged events are still queued at each kill.
    parents.status_override = 503

    def send(iid):
        body = home.played_payload(uid, iid)
        try:
            conn = HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("POST", "/webhook/home", json.dumps(body))
            if conn.getresponse().status == 202:
                acked.append(iid)
        except OSError:
            pass  # refused or cut off by the kill: not acknowledged, so not promised

    items = list(home.items)
    for round_ in range(5):
        proc = start_process(cfg, port)
        parents.status_override = 503 if round_ % 2 == 0 else None
        batch = items[round_ * 30 : (round_ + 1) * 30]
        goal = len(acked) + 8
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(send, iid) for iid in batch]
            eventually(lambda g=goal: len(acked) >= g, what="some acknowledgements")
            proc.send_signal(signal.SIGKILL)  # mid-burst
            for f in futures:
                f.result()
        proc.wait(5)
    assert len(acked) >= 40
    parents.status_override = None
    proc = start_process(cfg, port)
    try:
        names = [home.items[i]["Name"] for i in acked]
        eventually(
            lambda: all(parents.ud("alice", n)["Played"] for n in names),
            30,
            what=f"all {len(names)} acknowledged events applied after 5 kills",
        )
    finally:
        shut_down(proc, fakes)


# ── Issue 21.3/21.4: outages deliver by themselves; a refused API key is unhealthy ─────────


def problem_rows(c: Cluster) -> tuple[list[dict], list[dict]]:
    """The dashboard's "Waiting and failed": (waiting rows, failed and resolved rows)."""
    d = c.svc.call("GET", "/api/dashboard")[1]
    return d["waiting"], d["failed"]


def server_status(c: Cluster, name: str) -> dict:
    return next(s for s in c.svc.call("GET", "/api/status")[1]["servers"] if s["name"] == name)


def test_changes_owed_to_a_server_that_was_away_go_by_themselves_when_it_answers(cluster, caplog):
    # Every retry together lasts 0.2 + 0.4 s; the alert condition comes after 1.2 s away.
    c = cluster(max_retries=2, extra={"alerts": {"unreachable_minutes": 0.02}})
    caplog.set_level(logging.INFO, logger="jellyfin_db_sync")
    home, parents = c["home"], c["parents"]
    parents.go_away()
    home.user_favourites("alice", "Dune", True)  # reports the rating too: two jobs, one action
    home.user_marks("bob", "Heat", True)
    eventually(
        lambda: c["public"].ud("bob", "Heat")["Played"], what="the server that is up is not delayed"
    )
    waiting = eventually(
        lambda: (
            (rows := problem_rows(c)[0])
            and all(r["state"] == "unreachable" for r in rows)
            and len(rows) == 2
            and rows
        ),
        what="both changes waiting for parents",
    )
    assert {r["item_name"] for r in waiting} == {"Dune", "Heat"}, waiting
    assert all(r["retry_count"] == 0 and r["target_server"] == "parents" for r in waiting)
    status = server_status(c, "parents")
    assert (
        status["healthy"] is False
        and status["reachable"] is False
        and "cannot connect" in status["error"]
    )
    # Away far longer than all the retries would last: several health checks go by.
    away_since = time.time()
    health = c.svc.service.syncer.health["parents"]
    eventually(lambda: health["checked_at"] > away_since + 3, what="parents away for a while")
    assert problem_rows(c)[1] == [], "nothing failed while parents was away"
    # Said where a person looks: once in the log (not at every check), and as an alert condition
    # on /api/alerts even with no alert destination configured.
    said = [r.getMessage() for r in caplog.records if "what is owed to it waits" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("parents: GET ") and "cannot connect" in said[0], (
        said
    )
    active = c.svc.call("GET", "/api/alerts")[1]["active"]
    assert [a["condition"] for a in active] == ["unreachable:parents"], active
    parents.come_back()  # no "Run now", no Retry: it arrives by itself
    eventually(
        lambda: parents.ud("alice", "Dune")["IsFavorite"] and parents.ud("bob", "Heat")["Played"],
        what="the changes owed to parents",
    )
    c.settle()
    assert problem_rows(c) == ([], [])
    assert server_status(c, "parents")["healthy"] is True
    assert (
        "parents: answers again" in caplog.text
        and c.svc.call("GET", "/api/alerts")[1]["active"] == []
    )


def test_a_failed_change_a_pass_made_true_shows_resolved_and_retry_all_retries_the_rest(
    cluster, monkeypatch
):
    monkeypatch.setattr(jds, "HEALTH_CHECK_SECONDS", 0.3)  # each check also looks at what failed
    c = cluster(max_retries=1)
    home, parents = c["home"], c["parents"]
    dune, heat = parents.item("Dune"), parents.item("Heat")
    parents.writes_fail_items = {dune, heat}  # parents answers, but these writes fail: truly failed
    home.user_favourites("alice", "Dune", True)
    home.user_marks("bob", "Heat", True)
    failed = eventually(
        lambda: (
            (rows := [r for r in problem_rows(c)[1] if r["state"] == "failed"])
            and len(rows) == 2
            and rows
        ),
        what="two failed changes",
    )
    assert sorted(f for r in failed for f in r["fields"]) == ["favorite", "played"], (
        failed
    )  # one row per action
    parents.writes_fail_items = {heat}
    reconcile(c)  # the pass writes alice's favourite; bob's Heat fails again
    assert parents.ud("alice", "Dune")["IsFavorite"] and not parents.ud("bob", "Heat")["Played"]

    def rows_by_item():
        rows = problem_rows(c)[1]
        return {
            r["item_name"]: {x["state"] for x in rows if x["item_name"] == r["item_name"]}
            for r in rows
        }

    eventually(
        lambda: rows_by_item().get("Dune") == {"resolved"}, what="the favourite shown resolved"
    )
    assert rows_by_item()["Heat"] == {"failed"}  # the webhook's change, and the pass's
    still_failed = sum(len(r["ids"]) for r in problem_rows(c)[1] if r["state"] == "failed")
    assert (
        c.svc.call("GET", "/api/queue")[1]["failed_events"] == still_failed
    )  # resolved is not failed
    parents.writes_fail_items = set()
    status, body = c.svc.call("POST", "/api/events/retry-all")
    assert status == 200 and body["retried"] >= 1, body
    eventually(lambda: parents.ud("bob", "Heat")["Played"], what="the retried change")
    c.settle()
    assert {r["state"] for r in problem_rows(c)[1]} == {"resolved"}
    assert c.svc.call("GET", "/api/queue")[1]["failed_events"] == 0
    assert home.ud("alice", "Dune")["IsFavorite"], "the failed write never spread back as a removal"


def test_a_refused_api_key_is_unhealthy_everywhere_until_it_works(
    cluster, receiver, monkeypatch, caplog
):
    monkeypatch.setattr(jds, "ALERT_CHECK_SECONDS", 0.1)
    caplog.set_level("WARNING", logger="jellyfin_db_sync")
    wrong = hexid()
    alerts = {"urls": [f"{receiver.url}/hook"]}
    c = cluster(start=False, extra={"servers": {"parents": {"api_key": wrong}}, "alerts": alerts})
    c.start()  # the first health check has run: parents answers, but not to our key
    assert caplog.text.count("parents: the API key was refused (HTTP 401)") == 1, (
        "said in the log, once"
    )
    assert wrong not in caplog.text
    status = c.svc.call("GET", "/api/status")[1]
    parents = server_status(c, "parents")
    assert parents["healthy"] is False and parents["key_refused"] is True, parents
    assert "the API key was refused" in parents["error"] and wrong not in json.dumps(status)
    assert status["status"] == "degraded"
    sent = eventually(lambda: receiver.bodies("/hook"), what="an alert")
    assert [(a["condition"], a["level"]) for a in sent] == [("refused:parents", "problem")], sent
    assert "the API key was refused" in sent[0]["message"] and wrong not in json.dumps(sent)
    report = reconcile(c)  # a pass says why parents was left out, not just "0 items compared"
    assert any(e.startswith("parents: the API key was refused") for e in report["errors"]), report
    c["home"].user_marks("alice", "Heat", True)  # owed to parents: waits, uses up no retries
    eventually(
        lambda: [
            r
            for r in problem_rows(c)[0]
            if r["target_server"] == "parents" and r["state"] == "unreachable"
        ],
        what="the change waiting for parents",
    )
    c["parents"].api_key = wrong  # the key is fixed (in Jellyfin: the key was made there)
    eventually(lambda: server_status(c, "parents")["healthy"], what="parents healthy again")
    assert server_status(c, "parents")["error"] is None
    eventually(lambda: c["parents"].ud("alice", "Heat")["Played"], what="the change that waited")
    eventually(lambda: len(receiver.bodies("/hook")) == 2, what="the all-clear")
    assert receiver.bodies("/hook")[1]["level"] == "resolved"


@pytest.mark.browser
def test_browser_a_refused_key_and_an_outage_as_the_dashboard_shows_them(cluster, monkeypatch):
    need_chromium()
    from playwright.sync_api import expect, sync_playwright

    monkeypatch.setattr(jds, "HEALTH_CHECK_SECONDS", 0.3)
    c = cluster(
        start=False,
        max_retries=0,
        extra={"servers": {"parents": {"api_key": hexid()}}, "server": SIGN_IN},
    )
    c.start()
    signed_in(c)
    home, parents, public = c["home"], c["parents"], c["public"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        sign_in(page, c.svc.url)
        card = page.get_by_role("article", name="server parents")
        expect(card).to_contain_text("API key refused", timeout=10000)
        expect(card).to_contain_text("the API key was refused")
        expect(page.locator("#overall")).to_have_text("degraded")
        # A heart owed to parents: one row, waiting (the "no rating" it reports is no change).
        home.user_favourites("alice", "Dune", True)
        row = page.locator("#problems tbody tr", has_text="Dune")
        expect(row).to_contain_text("waiting for parents to answer", timeout=10000)
        expect(row).to_have_count(1)
        expect(row).to_contain_text("favourite")
        expect(row).not_to_contain_text("rating")
        expect(page.get_by_role("button", name="Retry all failed")).to_be_hidden()
        parents.api_key = c.config.server("parents").api_key  # the key is fixed
        expect(card).to_contain_text("reachable", timeout=10000)
        expect(page.locator("#problems-empty")).to_be_visible(timeout=10000)
        assert parents.ud("alice", "Dune")["IsFavorite"]
        # What truly failed: "Retry all failed" sends it once the cause is gone.
        public.writes_fail = True
        home.user_marks("bob", "Heat", True)
        row = page.locator("#problems tbody tr", has_text="Heat")
        expect(row).to_contain_text("failed", timeout=10000)
        public.writes_fail = False
        page.get_by_role("button", name="Retry all failed").click()
        eventually(lambda: public.ud("bob", "Heat")["Played"], what="the retried change")
        expect(page.locator("#problems-empty")).to_be_visible(timeout=10000)
        browser.close()


# ── Issue 21.6: removals settle, so the brake holds the whole burst ─────────


def unplayed_writes(fake: FakeJellyfin) -> int:
    """How many times the service marked something unplayed on this server (its recorded writes)."""
    return sum(1 for m, p in list(fake.requests) if m == "DELETE" and "playeditems" in p.lower())


def test_a_burst_of_unplayed_is_held_before_any_of_it_reaches_another_server(cluster, caplog):
    caplog.set_level("WARNING", logger="jellyfin_db_sync")
    # The brake as shipped: 100 items within 10 minutes, removals settling 20 s.
    c = cluster(start=False, extra={"safety": {"removal_delay_seconds": 20}})
    names = start_in_step(c, 300)
    home, others = c["home"], (c["parents"], c["public"])
    for n in names:  # home comes back from an old backup: 300 unplayed webhooks within seconds
        home.user_marks("alice", n, False)
    group = eventually(
        lambda: next((g for g in held(c) if g["changes"] == 300), None),
        60,
        what="all 300 unplayed held",
    )
    assert (
        group["source"] == "home"
        and group["user"] == "alice"
        and group["kinds"] == {"unplayed": 300}
    )
    c.settle(30)
    assert c.svc.call("GET", "/api/events/pending")[1] == [], (
        "nothing of the burst is still on its way"
    )
    for f in others:
        assert unplayed_writes(f) <= 10, (f.name, unplayed_writes(f))
        assert sum(not f.ud("alice", n)["Played"] for n in names) <= 10, f.name
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("brake:")]
    assert len(warnings) == 1, warnings  # one line for the burst; the dashboard has the count
    assert "home for alice held" in warnings[0] and "the dashboard counts them" in warnings[0]
    # Discard: home gets its played back, and nobody else lost anything.
    status, out = c.svc.call(
        "POST",
        "/api/held/discard",
        {"source": "home", "user": "alice"},
        {"Content-Type": "application/json"},
    )
    assert status == 200 and out["discarded"] == 300, out
    eventually(
        lambda: all(f.ud("alice", n)["Played"] for f in c.fakes for n in names),
        30,
        what="all played again",
    )
    c.settle(30)
    assert held(c) == [] and all(unplayed_writes(f) <= 10 for f in others)
    assert reconcile(c)["changes"] == 0


def test_a_lone_unplayed_arrives_after_the_settling_time(cluster):
    c = cluster(
        start=False, extra={"safety": {"removal_delay_seconds": 2}}
    )  # shortened, for the test
    films_played_everywhere(c, "alice", ["Heat"])
    c.start()
    c["home"].user_marks("alice", "Heat", False)
    pending = eventually(
        lambda: c.svc.call("GET", "/api/events/pending")[1], what="the unplayed queued"
    )
    for job in pending:  # due once it has settled, not before
        assert job["field"] == "played" and job["value"] is False and job["source_server"] == "home"
        assert parse_iso(job["next_retry_at"]) - parse_iso(job["created_at"]) == pytest.approx(
            2, abs=0.01
        )
    eventually(
        lambda: (
            not c["parents"].ud("alice", "Heat")["Played"]
            and not c["public"].ud("alice", "Heat")["Played"]
        ),
        30,
        what="the unplayed on the others",
    )
    assert held(c) == []


def test_additions_are_not_delayed_and_a_newer_one_replaces_a_settling_removal(cluster):
    # A settling time longer than any wait below: were additions delayed, this would time out.
    c = cluster(start=False, extra={"safety": {"removal_delay_seconds": 600}})
    films_played_everywhere(c, "alice", ["Heat"])
    c.start()
    home, parents, public = c["home"], c["parents"], c["public"]
    home.user_marks("alice", "Dune", True)
    home.user_favourites("alice", "Arrival", True)
    eventually(
        lambda: all(
            f.ud("alice", "Dune")["Played"] and f.ud("alice", "Arrival")["IsFavorite"]
            for f in c.fakes
        )
    )

    # Unplayed, then played again while the unplayed settles: the played replaces it, at once.
    def settling() -> list[dict]:
        return [j for j in c.svc.call("GET", "/api/events/pending")[1] if j["item_name"] == "Heat"]

    home.user_marks("alice", "Heat", False)
    assert all(j["value"] is False for j in eventually(settling, what="the unplayed settling"))
    home.user_marks("alice", "Heat", True)
    eventually(lambda: settling() == [], what="the played going at once")
    assert parents.ud("alice", "Heat")["Played"] and public.ud("alice", "Heat")["Played"]
    assert unplayed_writes(parents) == unplayed_writes(public) == 0


# ── Issue 21.2: undo then a pass ─────────────────────────────────────────────


def test_undo_one_write_then_a_pass_changes_nothing_and_the_next_change_travels(cluster):
    c = cluster()
    home, parents, public = c["home"], c["parents"], c["public"]
    home.user_rates("alice", "Arrival", True)  # alice likes a film on home: it goes everywhere
    eventually(
        lambda: (
            parents.ud("alice", "Arrival")["Rating"]
            == 10.0
            == public.ud("alice", "Arrival")["Rating"]
        )
    )
    c.settle()
    entry = journal(c, target="parents", field="likes")[0]
    status, preview = undo(c, id=entry["id"])
    assert status == 200 and preview["changes"] == 1, preview
    # The preview says what every server holds afterwards: only parents changes.
    assert preview["afterwards"] == {
        "home": ["alice: Arrival: liked (as now)"],
        "parents": ["alice: Arrival: rating cleared (put back)"],
        "public": ["alice: Arrival: liked (as now)"],
    }, preview["afterwards"]
    status, done = undo(c, dry_run=False, id=entry["id"])
    assert status == 202, done
    eventually(lambda: parents.ud("alice", "Arrival")["Rating"] is None, what="the undo on parents")
    c.settle()
    # A catch-up pass neither re-applies the like on parents nor spreads the undo to home.
    before = snapshot(c)
    report = reconcile(c)
    assert report["changes"] == 0 and not report["errors"], report
    assert snapshot(c) == before
    assert (
        home.ud("alice", "Arrival")["Rating"] == 10.0
        and parents.ud("alice", "Arrival")["Rating"] is None
    )
    # Her next change of that item on home travels as usual (the like only when she changes it).
    home.user_marks("alice", "Arrival", True)
    eventually(lambda: parents.ud("alice", "Arrival")["Played"], what="played on parents")
    c.settle()
    assert parents.ud("alice", "Arrival")["Rating"] is None, "playing it does not re-apply the like"
    home.user_rates("alice", "Arrival", None)
    c.settle()
    home.user_rates("alice", "Arrival", True)
    eventually(
        lambda: parents.ud("alice", "Arrival")["Rating"] == 10.0, what="the new like on parents"
    )
    c.settle()
    assert reconcile(c)["changes"] == 0
    assert all(f.ud("alice", "Arrival")["Rating"] == 10.0 for f in c.fakes)


def test_undo_an_events_writes_then_a_pass_changes_nothing_and_a_new_play_travels(cluster):
    c = cluster()
    home, parents, public = c["home"], c["parents"], c["public"]
    home.user_marks("alice", "Heat", True)
    home.user_favourites("bob", "Dune", True)  # someone else's change, outside the undo
    eventually(
        lambda: parents.ud("alice", "Heat")["Played"] and public.ud("alice", "Heat")["Played"]
    )
    eventually(
        lambda: parents.ud("bob", "Dune")["IsFavorite"] and public.ud("bob", "Dune")["IsFavorite"]
    )
    c.settle()
    cause = journal(c, target="parents", field="played", username="alice")[0]["cause"]
    status, preview = undo(c, cause=cause)
    assert preview["changes"] == 2, preview
    assert preview["afterwards"]["home"] == ["alice: Heat: played (as now)"], preview["afterwards"]
    assert preview["afterwards"]["public"] == ["alice: Heat: unplayed (put back)"], preview[
        "afterwards"
    ]
    undo(c, dry_run=False, cause=cause)
    eventually(
        lambda: (
            not parents.ud("alice", "Heat")["Played"] and not public.ud("alice", "Heat")["Played"]
        )
    )
    c.settle()
    before = snapshot(c)
    report = reconcile(c)
    assert report["changes"] == 0 and not report["errors"], report
    assert snapshot(c) == before, "the pass re-applied or spread the undo"
    assert home.ud("alice", "Heat")["Played"] and not parents.ud("alice", "Heat")["Played"]
    # She watches it again on home: that travels, and the next pass finds them in step.
    home.user_plays("alice", "Heat", [10 * MIN], completed=True)
    eventually(
        lambda: parents.ud("alice", "Heat")["Played"] and public.ud("alice", "Heat")["Played"]
    )
    c.settle()
    assert reconcile(c)["changes"] == 0


# ── Issue 23.2-3: a taken port, refused webhooks in the log ─────────────────


def test_a_taken_port_is_one_line_naming_the_address_and_the_setting_and_exit_2(
    tmp_path, fake_servers
):
    with socket.socket() as blocker:  # 8080 taken on a NAS: here, any port some program listens on
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        # The service, its port from the file…
        res = run_cli("--config", str(write_config(tmp_path, fake_servers("home"), port=port)))
        # …and setup mode (no configuration yet), its port from JDS_PORT.
        setup = run_cli(
            "--config",
            str(tmp_path / "none.yaml"),
            env={"JDS_PORT": str(port), "JDS_HOST": "127.0.0.1"},
        )
    for r in (res, setup):
        assert r.returncode == 2, r.stderr
        said = [line for line in r.stderr.splitlines() if "cannot listen" in line]
        assert len(said) == 1 and f"127.0.0.1:{port}" in said[0] and "already in use" in said[0], (
            r.stderr
        )
        assert "server.port" in said[0] and "JDS_PORT" in said[0] and "Traceback" not in r.stderr


def test_refused_webhooks_are_logged_once_a_minute_per_server_with_what_to_change(
    cluster, caplog, monkeypatch
):
    caplog.set_level("WARNING", logger="jellyfin_db_sync")
    token = "the-right-token-0123"
    svc = cluster(extra={"server": {"webhook_token": token}}).svc
    body = fixture("UserDataSaved-played.json")

    def refusals() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if "refused" in r.getMessage() and r.levelname == "WARNING"
        ]

    # The plugin on "parents" sends a stale token, twice in a row: one line, not one per webhook.
    for _ in range(2):
        assert (
            svc.call("POST", "/webhook/parents", body, {"X-Webhook-Token": "a-stale-token-456"})[0]
            == 401
        )
    [line] = refusals()
    assert line.startswith("webhook from parents refused (401") and "X-Webhook-Token" in line
    assert "Set up webhooks" in line and "server.webhook_token" in line
    assert token not in caplog.text and "a-stale-token-456" not in caplog.text
    # Another server's mistake is its own line: "home" sends a custom template that is not JSON.
    headers = {"X-Webhook-Token": token}
    assert svc.call("POST", "/webhook/home", b'{"Name": {{Name}}}', headers)[0] == 400
    assert len(refusals()) == 2 and refusals()[1].startswith("webhook from home refused (400")
    assert "Send All Properties" in refusals()[1]
    # The dashboard still counts every one of them.
    parents = next(s for s in svc.call("GET", "/api/servers")[1] if s["name"] == "parents")
    assert parents["rejected_webhooks"]["count"] == 2
    # Once the minute is up, the next refusal is logged again.
    monkeypatch.setattr(jds, "REFUSED_LOG_SECONDS", 0.0)
    svc.call("POST", "/webhook/home", b'{"Name": {{Name}}}', headers)
    svc.call("POST", "/webhook/home", b'{"Name": {{Name}}}', headers)
    assert len(refusals()) == 4


@pytest.mark.browser
def test_browser_a_refused_webhook_shows_on_its_servers_card_with_the_reason_as_written(cluster):
    need_chromium()
    from playwright.sync_api import expect, sync_playwright

    c = cluster()
    # Something that is not the plugin posts to parents' URL: a reason that ends in "?".
    assert c.svc.call("POST", "/webhook/parents", {"Name": "Arrival"})[0] == 400
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(c.svc.url + "/")
        card = page.get_by_role("article", name="server parents")
        expect(card).to_contain_text("1 webhook(s) refused", timeout=10000)
        expect(card).to_contain_text(
            "is this the Jellyfin Webhook plugin? A value the sync cannot use"
        )
        assert "?." not in card.inner_text()


# ── Issue 21.5: items on one server only ─────────────────────────────────────


def open_counts(c: Cluster) -> dict:
    """What /api/status counts as waiting, failed or skipped (the dashboard's figures)."""
    st = c.svc.call("GET", "/api/status")[1]
    q = st["queue"]
    return {
        "waiting": q["waiting_for_item_events"],
        "failed": q["failed_events"],
        "skipped": q["skipped_events"],
        "failed_syncs": st["sync_stats"]["failed"],
    }


def problems_about(c: Cluster, title: str) -> list[dict]:
    """The dashboard's "Waiting and failed" rows for an item."""
    d = c.svc.call("GET", "/api/dashboard")[1]
    return [j for j in d["waiting"] + d["failed"] if j["item_name"].startswith(title)]


NOPE = ("Nope", "Movie", "/media/films/Nope (2022)/Nope.mkv")  # no path policy covers it
SOON = ("Soon", "Movie", "/media/incoming/Soon (2026)/Soon.mkv")  # a policy waits for it


def test_a_film_only_on_home_is_only_on_home_not_waiting_or_failed_until_it_arrives(cluster):
    c = cluster(
        policies=[
            {"prefix": "/media/incoming", "absent_retry_count": -1, "retry_delay_seconds": 0.3}
        ]
    )
    home, parents, public = c["home"], c["parents"], c["public"]
    home.add_item(*NOPE, provider_ids={"Imdb": "tt10954984"})
    before = open_counts(c)
    home.user_plays("alice", "Nope", [600 * 10**7], completed=True)  # the plugin's webhooks
    # Parents and public do not have it: each change ends "not on that server" in the feed…
    # noqa: E731
    absent = lambda: c.svc.call("GET", "/api/sync-log?item_name=nope&result=absent")[1]["entries"]
    eventually(
        lambda: {e["target"] for e in absent()} == {"parents", "public"},
        what="'not on that server'",
    )
    c.settle()
    assert all("is not on" in e["detail"] and "path_sync_policy" in e["detail"] for e in absent())
    # …and is neither waiting nor failed: not listed, not counted, nothing open in the queue.
    assert problems_about(c, "Nope") == []
    assert (
        c.svc.call("GET", "/api/events/failed")[1] == []
        and c.svc.call("GET", "/api/events/waiting")[1] == []
    )
    assert open_counts(c) == before
    metrics = c.svc.call("GET", "/metrics")[1]
    assert re.search(
        r'^jellyfin_db_sync_sync_results_total\{target="parents",result="absent"\} [1-9]',
        metrics,
        re.M,
    )
    assert not re.search(
        r'^jellyfin_db_sync_jobs\{state="(skipped|failed|waiting)"\} [1-9]', metrics, re.M
    )
    # The inspector says it is only on home, and syncing it now explains why there is nothing to do.
    found = c.svc.call("GET", "/api/inspect?q=nope&person=alice")[1]
    assert found["only_on"] == "home" and found["open_changes"] == []
    json_ = {"Content-Type": "application/json"}
    status, answer = c.svc.call(
        "POST", "/api/inspect/sync", {"item": found["item"]["id"], "person": "alice"}, json_
    )
    assert status == 409 and "only on home" in answer["error"] and answer["only_on"] == "home"
    assert open_counts(c) == before and problems_about(c, "Nope") == []
    # Where a path policy says to wait for items on a server, the change waits there instead.
    home.add_item(*SOON)
    home.user_marks("alice", "Soon", True)
    eventually(
        lambda: {j["target_server"] for j in problems_about(c, "Soon")} == {"parents", "public"},
        what="the changes waiting for Soon",
    )
    assert all(j["state"] == "waiting" for j in problems_about(c, "Soon"))
    soon = c.svc.call("GET", "/api/inspect?q=soon&person=alice")[1]
    assert soon["only_on"] == "home" and {j["state"] for j in soon["open_changes"]} == {"waiting"}
    assert open_counts(c)["waiting"] == before["waiting"] + 2
    # Parents' library scan finds both films (no ItemAdded webhook): the waiting change lands by
    # itself; Nope's next change goes through as usual, and a pass brings the play before it.
    parents.add_item(*NOPE, provider_ids={"Imdb": "tt10954984"})
    parents.add_item(*SOON)
    eventually(lambda: parents.ud("alice", "Soon")["Played"], what="the waiting change to land")
    home.user_favourites("alice", "Nope", True)
    eventually(
        lambda: parents.ud("alice", "Nope")["IsFavorite"], what="Nope's next change on parents"
    )
    assert c.svc.call("GET", "/api/inspect?q=nope&person=alice")[1]["only_on"] is None
    reconcile(c)
    assert parents.ud("alice", "Nope")["Played"] and parents.ud("alice", "Nope")["PlayCount"] >= 1
    # Public still lacks Nope: its favourite is "not on that server" there too, no failure.
    assert "Nope" not in [i["Name"] for i in public.items.values()]
    assert problems_about(c, "Nope") == []
    assert open_counts(c) == {
        **before,
        "waiting": before["waiting"] + 1,
    }  # Soon still waits for public


def test_changes_skipped_before_for_an_item_only_on_one_server_leave_the_failed_list(cluster):
    # Before issue 21.5 such a change ended "skipped" and stayed under "Waiting and failed"
    # for good. An upgraded database moves them out; one a path policy had waited for stays.
    c = cluster()
    c["home"].add_item(*NOPE)
    c["home"].user_marks("alice", "Nope", True)
    eventually(
        lambda: (
            len(c.svc.call("GET", "/api/sync-log?item_name=nope&result=absent")[1]["entries"]) == 2
        )
    )
    c.settle()
    c.svc.stop()
    conn = sqlite3.connect(c.config.database_path)
    with conn:  # the file as the previous version left it
        conn.execute("UPDATE jobs SET status='skipped' WHERE status='absent'")
        conn.execute(
            "UPDATE jobs SET absent_count=3 WHERE id=(SELECT max(id) FROM jobs WHERE "
            "status='skipped')"
        )
        conn.execute("UPDATE meta SET value='4' WHERE key='schema_version'")
    conn.close()
    c.start()
    failed = c.svc.call("GET", "/api/events/failed")[1]
    assert [j["item_not_found_count"] for j in failed] == [3]
    assert open_counts(c)["skipped"] == 1


@pytest.mark.browser
def test_browser_a_film_only_on_home_is_said_so_and_not_offered_to_sync(cluster):
    need_chromium()
    from playwright.sync_api import expect, sync_playwright

    c = cluster(
        policies=[
            {"prefix": "/media/incoming", "absent_retry_count": -1, "retry_delay_seconds": 60}
        ]
    )
    c["home"].add_item(*NOPE)
    c["home"].add_item(*SOON)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(c.svc.url + "/")
        expect(page.get_by_role("article", name="server home")).to_contain_text(
            "reachable", timeout=10000
        )
        c["home"].user_marks("alice", "Nope", True)
        expect(page.locator("#feed tbody tr", has_text="Nope").first).to_contain_text(
            "not on that server", timeout=10000
        )
        c.settle()  # both changes ended: the next refresh (every 2 s) shows nothing stuck
        expect(page.locator("#problems-empty")).to_be_visible(timeout=10000)
        expect(page.locator("#q-failed")).to_have_text("0")
        expect(page.locator("#q-waiting")).to_have_text("0")
        page.get_by_label("Title").fill("Nope")
        page.get_by_label("Person").fill("alice")
        page.get_by_role("button", name="Look").click()
        expect(page.locator("#only-on")).to_contain_text("Only on home", timeout=10000)
        expect(page.get_by_role("button", name="Sync this item now")).to_have_count(0)
        # Under a path policy that waits, the film is only on home *for now*: its changes wait.
        c["home"].user_marks("alice", "Soon", True)
        expect(page.locator("#problems tbody tr", has_text="Soon")).to_have_count(2, timeout=10000)
        page.get_by_label("Title").fill("Soon")
        page.get_by_role("button", name="Look").click()
        expect(page.locator("#only-on")).to_contain_text("Only on home for now", timeout=10000)
        expect(page.get_by_role("button", name="Sync this item now")).to_have_count(0)
        browser.close()

        browser.close()


# ── Issue 23.6/23.7: one vocabulary, one count; "Set up webhooks" says so on the card ─────────


def counts(c: Cluster) -> dict:
    """What the dashboard shows as numbers: Recent syncs (its default "changes"), "changes in the
    last hour" and the two charts' totals."""
    d = c.svc.call("GET", "/api/dashboard?result=changes&minutes=60")[1]
    return {
        "recent syncs": d["log"]["total"],
        "last hour": d["status"]["queue"]["changes_last_hour"],
        "chart": d["timeline"]["total"],
        "chart bars": sum(p["ok"] + p["failed"] + p["other"] for p in d["timeline"]["points"]),
        "24 h chart": d["hourly"]["total"],
    }


def test_after_five_actions_recent_syncs_the_last_hour_and_the_charts_count_the_same_five(cluster):
    c = cluster(
        versions=("10.10.7", "10.11.8"), max_retries=0
    )  # home and parents: one write per action
    home, parents = c["home"], c["parents"]
    home.user_marks("alice", "Arrival", True)
    home.user_favourites("alice", "Dune", True)
    parents.ud("alice", "Arrival")["IsFavorite"] = True  # unseen: no webhook
    home.user_favourites("alice", "Arrival", True)  # "already so" on parents: changes nothing
    home.user_marks("bob", "Heat", True)
    parents.user_marks("alice", "Heat", True)
    c.settle()
    parents.writes_fail = True
    home.user_marks("bob", "Dune", True)  # fails on parents
    eventually(lambda: c.svc.call("GET", "/api/events/failed")[1], what="the failed change")
    parents.writes_fail = False
    c.settle()
    assert set(counts(c).values()) == {5}, counts(c)  # four written, one failed
    d = c.svc.call("GET", "/api/dashboard?minutes=60")[1]
    points = d["timeline"]["points"]
    assert (sum(p["ok"] for p in points), sum(p["failed"] for p in points)) == (4, 1)
    everything = [e["result"] for e in d["log"]["entries"]]
    assert "noop" in everything and len(everything) > 5, (
        "the lines that changed nothing are not counted"
    )
    assert c.svc.call("GET", "/api/queue")[1]["changes_last_hour"] == 5


def test_the_feed_the_inspector_and_the_problems_say_the_apis_words(cluster):
    c = cluster(max_retries=0)
    home, public = c["home"], c["public"]
    public.ud("alice", "Dune")["IsFavorite"] = True  # unseen: no webhook
    home.user_favourites("alice", "Dune", True)  # written on parents, "already so" on public
    c.settle()
    public.writes_fail = True
    home.user_marks("alice", "Dune", True)  # fails on public: an open change in the inspector
    eventually(lambda: c.svc.call("GET", "/api/events/failed")[1], what="the failed change")
    d = c.svc.call("GET", "/api/dashboard?limit=50")[1]
    words = d["words"]
    assert (words["result"]["ok"], words["result"]["noop"], words["result"]["absent"]) == (
        "written",
        "already so",
        "not on that server",
    )
    assert words["chart"] == {
        "ok": "written",
        "failed": "failed",
        "other": "skipped, not on that server or dry run",
    }
    feed = {e["id"]: e for e in d["log"]["entries"]}
    assert {e["result_word"] for e in feed.values()} >= {"written", "already so", "failed"}
    for e in feed.values():
        assert (e["result_word"], e["field_word"]) == (
            words["result"][e["result"]],
            words["field"][e["field"]],
        )
    found = c.svc.call("GET", "/api/inspect?q=dune&person=alice")[1]
    assert found["recent"], found
    for e in found["recent"]:  # the same lines, in the same words as the feed
        assert (e["result_word"], e["field_word"]) == (
            feed[e["id"]]["result_word"],
            feed[e["id"]]["field_word"],
        )
    assert [(j["state_word"], j["field_word"]) for j in found["open_changes"]] == [
        ("failed", "watched")
    ]
    assert all("path_key" not in s["matched_by"] for s in found["servers"])
    assert [(r["state_word"], r["fields"]) for r in d["failed"]] == [("failed", ["played"])]
    # The page keeps no second copy of these words: only the API's.
    app, page = (
        (HERE / "static" / "app.js").read_text(),
        (HERE / "static" / "index.html").read_text(),
    )
    for text in (
        "written",
        "already so",
        "not on that server",
        "older",
        "dry run",
        "watched",
        "favourite",
    ):
        assert f'"{text}"' not in app and f">{text}<" not in page, text


def setup_webhook(c: Cluster, server: str) -> tuple[int, dict]:
    return c.svc.call(
        "POST",
        f"/api/servers/{server}/setup-webhook",
        {"public_url": c.svc.url},
        {"Content-Type": "application/json"},
    )


def test_set_up_webhooks_says_when_then_waits_for_the_first_event_then_says_when_it_came(cluster):
    c = cluster()
    home, parents, public = c["home"], c["parents"], c["public"]
    home.webhook_url = None  # home's plugin was never set up by hand
    public.plugin_installed = False
    parents.user_marks(
        "alice", "Arrival", True
    )  # webhooks from parents (home is written, sends none)
    c.settle()
    before = server_status(c, "home")
    assert (
        before["webhook_set_up_at"],
        before["last_webhook_at"],
        before["awaiting_first_webhook"],
    ) == (
        None,
        None,
        False,
    )
    t0 = time.time()
    status, answer = setup_webhook(c, "home")
    assert status == 200 and answer["result"] == "added" and answer["awaiting_first_webhook"], (
        answer
    )
    home_now = server_status(c, "home")
    assert home_now["awaiting_first_webhook"] and home_now["first_webhook_at"] is None
    assert t0 - 1 <= parse_iso(home_now["webhook_set_up_at"]) <= time.time() + 1
    assert server_status(c, "parents")["webhook_set_up_at"] is None, "per server"
    # Another server's webhook is not home's first.
    body = parents.played_payload(parents.user("alice"), parents.item("Arrival"))
    assert c.svc.call("POST", "/webhook/parents", body)[0] == 202
    c.settle()
    assert server_status(c, "home")["awaiting_first_webhook"]
    # Not installed: said, and nothing recorded as set up.
    status, answer = setup_webhook(c, "public")
    assert status == 502 and "not installed" in answer["message"]
    assert server_status(c, "public")["webhook_set_up_at"] is None
    # home's first webhook, through the destination the service set up.
    home.user_marks("bob", "Heat", True)
    first = eventually(
        lambda: server_status(c, "home")["first_webhook_at"], what="home's first webhook"
    )
    c.settle()
    after = server_status(c, "home")
    assert (
        not after["awaiting_first_webhook"]
        and after["webhook_set_up_at"] == home_now["webhook_set_up_at"]
    )
    assert (
        parse_iso(home_now["webhook_set_up_at"])
        <= parse_iso(first)
        <= parse_iso(after["last_webhook_at"])
    )
    home.user_marks("bob", "Dune", True)
    eventually(
        lambda: server_status(c, "home")["last_webhook_at"] != after["last_webhook_at"],
        what="a later one",
    )
    assert server_status(c, "home")["first_webhook_at"] == first, "the first stays the first"


@pytest.mark.browser
def test_browser_set_up_webhooks_on_the_card_and_one_count_in_the_apis_words(cluster):
    need_chromium()
    from playwright.sync_api import expect, sync_playwright

    c = cluster(versions=("10.10.7", "10.11.8"), extra={"server": SIGN_IN})
    signed_in(c)
    home, parents = c["home"], c["parents"]
    home.webhook_url = None  # home's plugin was never set up by hand
    dialogs: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        sign_in(page, c.svc.url)
        card = page.get_by_role("article", name="server home")
        expect(card).to_contain_text("No webhook received yet", timeout=10000)
        card.get_by_role("button", name="Set up webhooks").click()
        expect(card).to_contain_text("Webhook plugin destination added", timeout=10000)
        expect(card).to_contain_text(re.compile(r"Set up at \S.*; waiting for the first event"))
        expect(card).not_to_contain_text("No webhook received yet")
        home.user_marks("alice", "Arrival", True)
        expect(card).to_contain_text(
            re.compile(r"Set up at \S.*; first event at \S"), timeout=10000
        )
        expect(card).to_contain_text("Last webhook")
        parents.user_marks("bob", "Heat", True)
        c.settle()
        # Two actions, two changes written: the same number, in the same words, everywhere.
        expect(page.locator("#q-done")).to_have_text("2", timeout=10000)
        expect(page.locator("#chart-total")).to_have_text("(2 changes)", timeout=10000)
        expect(page.locator("#page")).to_have_text("1–2 of 2 changes")
        expect(page.locator("#legend")).to_contain_text("written")
        expect(page.locator("#legend")).to_contain_text("skipped, not on that server or dry run")
        expect(page.locator("#f-result option[value=noop]")).to_have_text("already so")
        expect(page.locator("#feed tbody tr").first).to_contain_text("written")
        page.get_by_label("Title").fill("Arrival")
        page.get_by_label("Person").fill("alice")
        page.get_by_role("button", name="Look").click()
        expect(page.locator("#inspection")).to_contain_text(
            "alice watched home → parents: written", timeout=10000
        )
        expect(page.locator("#inspection")).not_to_contain_text(": ok")
        assert dialogs == [], "no dialog to dismiss"
        browser.close()


# ── Issue 22.1, 22.3, 22.6: no change without a sign-in, trimmed secrets, 400 not 500 ──────


WRITES = [  # every route that changes something, with a body the dashboard or a script sends
    ("/api/servers/home/setup-webhook", {"public_url": "http://203.0.113.9:9999"}),
    ("/api/undo", {"cause": "x", "dry_run": False}),
    ("/api/held/apply", {"source": "home", "user": "alice"}),
    ("/api/held/discard", {"source": "home", "user": "alice"}),
    ("/api/reconcile", {}),
    ("/api/events/1/retry", {}),
    ("/api/events/1/discard", {}),
    ("/api/inspect/sync", {"item": "home:x", "person": "alice"}),
    ("/api/alerts/test", {}),
]


def test_without_a_sign_in_configured_the_dashboard_is_read_only(cluster):
    c = cluster(start=False)
    # The older program's configs set neither server.auth nor server.api_token.
    c.config = jds.dataclasses.replace(c.config, api_token="")
    svc = c.start()
    home = c["home"]
    plugin_before = copy.deepcopy(home.plugin_config)
    as_json = {"Content-Type": "application/json"}
    for path, body in WRITES:
        status, answer = svc.call("POST", path, body, as_json)
        assert status == 403 and answer["read_only"], (path, answer)
        assert "server.auth" in answer["error"] and "server.api_token" in answer["error"], answer
        assert "#security-and-safety" in answer["error"]
    assert home.plugin_config == plugin_before, "a stranger's address must never reach the plugin"
    # Looking stays open, and the dashboard knows to hide its buttons and says what to set.
    status = svc.call("GET", "/api/dashboard")[1]["status"]
    assert status["read_only"] is True
    assert any("read-only" in w and "server.auth" in w for w in status["warnings"]), status[
        "warnings"
    ]
    for path in ("/api/journal", "/api/held", "/api/sync-log", "/api/alerts"):
        assert svc.call("GET", path)[0] == 200, path
    # Webhooks have their own token: they still sync.
    c.settle()
    home.webhook_url = f"{svc.url}/webhook/home"
    home.user_marks("alice", "Dune", True)
    eventually(
        lambda: c["parents"].ud("alice", "Dune")["Played"], what="a webhook to sync while read-only"
    )
    svc.stop()

    # With server.api_token (still no sign-in), scripts change things with it, nobody without.
    c.config = jds.dataclasses.replace(c.config, api_token=TOKEN)
    svc = c.start()
    nobody = {**as_json, "Authorization": ""}
    status, answer = svc.call("POST", "/api/servers/home/setup-webhook", WRITES[0][1], nobody)
    assert status == 403 and "Bearer <server.api_token>" in answer["error"], answer
    wrong = {**as_json, "Authorization": "Bearer not-the-token-at-all"}
    assert svc.call("POST", "/api/reconcile", {}, wrong)[0] == 403
    bearer = {**as_json, "Authorization": f"Bearer {TOKEN}"}
    status, answer = svc.call(
        "POST", "/api/servers/home/setup-webhook", {"public_url": svc.url}, bearer
    )
    assert status == 200, answer
    assert svc.call("GET", "/api/dashboard")[1]["status"]["read_only"] is True, (
        "a browser cannot send it"
    )
    svc.stop()

    # With server.auth, the dashboard is not read-only and a signed-in session changes things.
    c.config = jds.dataclasses.replace(
        c.config, auth_username="admin", auth_password="correct horse"
    )
    svc = c.start()
    assert svc.call("POST", "/api/reconcile", {}, {**as_json, "Authorization": ""})[0] == 401
    import base64

    basic = {"Authorization": "Basic " + base64.b64encode(b"admin:correct horse").decode()}
    assert svc.call("GET", "/api/dashboard", None, basic)[1]["status"]["read_only"] is False
    assert svc.call("POST", "/api/reconcile", {"dry_run": True}, {**as_json, **basic})[0] in (
        200,
        202,
    )


def test_the_start_up_log_says_once_that_the_dashboard_is_read_only(tmp_path, fake_servers):
    import yaml

    fakes = fake_servers("home", "parents")
    port = free_port()
    path = write_config(tmp_path, fakes, port=port)
    data = yaml.safe_load(path.read_text())
    del data["server"]["api_token"]
    path.write_text(yaml.safe_dump(data))
    proc = start_process(path, port)
    shut_down(proc, [])
    said = [line for line in process_log(proc).splitlines() if "read-only" in line]
    assert len(said) == 1 and "WARNING" in said[0] and "server.auth" in said[0], said


def secrets_shown(secrets: list[str], *texts: str) -> list[str]:
    """The secrets (or any 8-character piece of one) that appear in ``texts``."""
    found = []
    for secret in secrets:
        pieces = {secret[i : i + 8] for i in range(0, max(1, len(secret) - 7), 4)}
        if any(piece in text for piece in pieces for text in texts):
            found.append(secret)
    return found


def test_secrets_with_a_trailing_newline_are_trimmed_and_never_shown(tmp_path, fake_servers):
    import yaml

    home, parents = fakes = fake_servers("home", "parents")
    for f in fakes:
        f.add_user("alice")
        f.add_item(
            "Dune", "Movie", "/media/movies/Dune (2021)/Dune.mkv", provider_ids={"Tmdb": "438631"}
        )
    port = free_port()
    path = write_config(tmp_path, fakes, port=port)
    data = yaml.safe_load(path.read_text())
    del data["servers"][0]["api_key"], data["server"]["api_token"]
    path.write_text(yaml.safe_dump(data))
    api_token, hook_token = "api-token-from-a-secret-file", "webhook-token-in-a-variable"
    token_file = tmp_path / "api_token"
    token_file.write_text(f"{api_token}\n")
    env = {
        "JDS_SERVER_1_API_KEY": f"{home.api_key}\n",  # a Kubernetes secret as a variable
        "JDS_API_TOKEN_FILE": str(token_file),
        "JDS_WEBHOOK_TOKEN": f"{hook_token}\r\n",
    }
    secrets = [home.api_key, parents.api_key, api_token, hook_token]
    answers: list[str] = []

    def call(method: str, route: str, body: dict | None = None, token: str = api_token):
        conn = HTTPConnection("127.0.0.1", port, timeout=10)
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        conn.request(method, route, json.dumps(body) if body is not None else None, headers)
        resp = conn.getresponse()
        text = resp.read().decode()
        conn.close()
        answers.append(text)
        return resp.status, json.loads(text) if text[:1] in ("{", "[") else text

    proc = start_process(path, port, env=env)
    eventually(lambda: call("GET", "/readyz")[0] == 200, what="ready: the key is usable")
    status, answer = call(
        "POST", "/api/servers/home/setup-webhook", {"public_url": f"http://127.0.0.1:{port}"}
    )
    assert status == 200, answer
    ours = next(
        d for d in home.plugin_config["GenericOptions"] if d["WebhookName"] == "jellyfin-db-sync"
    )
    assert {"Key": "X-Webhook-Token", "Value": hook_token} in ours["Headers"], (
        "the token without its newline"
    )
    home.user_marks("alice", "Dune", True)
    eventually(lambda: parents.ud("alice", "Dune")["Played"], what="a sync with the trimmed key")
    for route in (
        "/api/status",
        "/api/dashboard",
        "/api/servers",
        "/api/sync-log",
        "/api/journal",
        "/metrics",
    ):
        assert call("GET", route)[0] == 200, route
    shut_down(proc, [])
    log_text = process_log(proc)
    assert "Traceback" not in log_text and "Invalid header" not in log_text, log_text
    assert secrets_shown(secrets, log_text, *answers) == []

    # A key broken inside (a line break in the middle) is a configuration error naming the
    # variable, never showing the key.
    broken = f"{home.api_key[:16]}\r\n{home.api_key[16:]}"
    checked = run_cli(
        "--check-config", "--config", str(path), env={**env, "JDS_SERVER_1_API_KEY": broken}
    )
    said = checked.stdout + checked.stderr
    assert checked.returncode == 2 and "JDS_SERVER_1_API_KEY" in said, said
    assert secrets_shown([home.api_key[:16], home.api_key[16:]], said) == []
    # The same in the file names servers[0].api_key.
    data["servers"][0]["api_key"] = broken
    path.write_text(yaml.safe_dump(data))
    checked = run_cli(
        "--check-config", "--config", str(path), env={"JDS_API_TOKEN_FILE": str(token_file)}
    )
    said = checked.stdout + checked.stderr
    assert checked.returncode == 2 and "servers[0].api_key" in said, said
    assert secrets_shown([home.api_key[:16], home.api_key[16:]], said) == []


def test_the_setup_page_trims_a_pasted_key_and_never_answers_500(tmp_path, fake_servers):
    home, parents = fake_servers("home", "parents")
    port = free_port()
    path = tmp_path / "config.yaml"
    proc, code = start_setup_mode(path, port)
    answers: list[str] = []

    def call(route: str, body: dict):
        conn = HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request(
            "POST",
            route,
            json.dumps(body),
            {"Content-Type": "application/json", "X-Setup-Code": code},
        )
        resp = conn.getresponse()
        text = resp.read().decode()
        conn.close()
        answers.append(text)
        return resp.status, json.loads(text)

    pasted = {"name": "home", "url": home.url, "api_key": f"{home.api_key}\r\n"}
    status, tested = call("/api/setup/test", pasted)
    assert status == 200 and tested["ok"] is True, tested
    broken = {**pasted, "api_key": f"{home.api_key[:16]}\r\n{home.api_key[16:]}"}
    status, tested = call("/api/setup/test", broken)
    assert status == 200 and tested["ok"] is False and "api_key" in tested["error"], tested
    servers = [pasted, {"name": "parents", "url": parents.url, "api_key": f" {parents.api_key}\n"}]
    status, saved = call("/api/setup/save", {"servers": servers})
    assert status == 200 and saved["ok"], saved
    assert [s.api_key for s in jds.load_config(path, {}).servers] == [home.api_key, parents.api_key]
    assert f"{home.api_key}\r" not in path.read_text()
    shut_down(proc, [])
    assert secrets_shown([home.api_key, parents.api_key], process_log(proc), *answers) == []


def test_numbers_dates_and_bodies_out_of_range_get_400_naming_the_field(cluster):
    c = cluster()
    svc = c.svc
    as_json = {"Content-Type": "application/json"}
    status, answer = svc.call("POST", "/api/undo", {"id": 10**30}, as_json)
    assert status == 400 and answer["error"].startswith("id:"), answer
    status, answer = svc.call("POST", "/api/undo", {"id": "-3"}, as_json)
    assert status == 400 and answer["error"].startswith("id:"), answer
    status, answer = svc.call("POST", "/api/undo", {"since": "9999-12-31T23:59:59-14:00"}, as_json)
    assert status == 400 and "since" in answer["detail"], answer
    status, answer = svc.call("GET", "/api/journal?since=9999-12-31T23:59:59-14:00")
    assert status == 400 and "since" in answer["detail"], answer
    deep = "[" * 50_000 + "]" * 50_000
    for path in ("/api/undo", "/api/held/apply", "/api/inspect/sync"):
        status, answer = svc.call("POST", path, deep, as_json)
        assert status == 400 and "body" in answer["detail"] and "nested" in answer["detail"], (
            path,
            answer,
        )
    assert svc.call("GET", "/api/status")[0] == 200
    assert svc.call("GET", "/readyz")[0] == 200


@pytest.mark.browser
def test_browser_read_only_dashboard_hides_its_buttons_and_says_what_to_set(cluster):
    need_chromium()
    from playwright.sync_api import expect, sync_playwright

    c = cluster(max_retries=0)  # the API token only: a browser cannot send it
    c["parents"].writes_fail = True  # up, but its writes fail
    c["home"].user_favourites("bob", "Dune", True)  # a failed change: its row has Retry and Discard
    eventually(lambda: c.svc.call("GET", "/api/events/failed")[1], what="a failed change")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(c.svc.url + "/")
        expect(page.locator("#warnings")).to_contain_text("read-only", timeout=10000)
        expect(page.locator("#warnings")).to_contain_text("server.auth")
        expect(page.locator("#problems tbody")).to_contain_text("Dune", timeout=10000)
        for selector in (
            "button.setup-webhook",
            "#problems .actions button",
            "#rec-run",
            "#undo-form button",
        ):
            assert page.locator(selector).count() > 0, selector
            expect(page.locator(selector).first).to_be_hidden()
        expect(page.get_by_role("button", name="Look")).to_be_visible()  # looking stays open
        browser.close()


# ── Issue 26.3–4: the recent check catches what no webhook brought; a silent plugin is named ──


def recent_rounds(c: Cluster, n: int = 2) -> None:
    """Wait until every server's people were checked ``n`` more times by the recent check."""
    for _ in range(n):
        before = c.svc.call("GET", "/api/status")[1]["recent_check"]["last_run"]

        def later(before=before):
            now = c.svc.call("GET", "/api/status")[1]["recent_check"]["last_run"]
            return len(now) == len(c.fakes) and all(now[k] != before.get(k) for k in now)

        eventually(later, what="a round of the recent check")


def test_with_the_plugin_silent_plays_still_arrive_and_the_card_says_why(
    cluster, receiver, monkeypatch
):
    monkeypatch.setattr(jds, "ALERT_CHECK_SECONDS", 0.1)
    every = 0.2
    c = cluster(
        start=False,
        extra={
            "reconcile": {"recent_check_seconds": every},
            "alerts": {"urls": [f"{receiver.url}/hook"]},
        },
    )
    for f in c.fakes:
        f.add_library(30)  # more than a page: bob, who never played anything, still costs one read
    c.start()
    home, parents, public = c["home"], c["parents"], c["public"]
    recent_rounds(c, 1)  # the first check of each person only notes where their list stands
    home.webhook_url = None  # home's plugin posts nothing to us (its destination points elsewhere)
    runtime = home.items[home.item("Dune")]["RunTimeTicks"]
    home.user_plays("alice", "Arrival", [10**10, 5 * 10**10], completed=True)  # to the end
    home.user_plays("alice", "Dune", [10**10, runtime // 2])  # stopped half way
    for f in (parents, public):
        eventually(
            lambda f=f: f.ud("alice", "Arrival")["Played"], what=f"Arrival played on {f.name}"
        )
        eventually(
            lambda f=f: f.ud("alice", "Dune")["PlaybackPositionTicks"] == runtime // 2,
            what=f"Dune's position on {f.name}",
        )
    assert not parents.ud("bob", "Arrival")["Played"], "another person's state must not change"
    c.settle()
    # In step now: more rounds read the same lists on every server and write nothing, anywhere.
    writes = [f.writes() for f in c.fakes]
    recent_rounds(c, 3)
    assert [f.writes() for f in c.fakes] == writes
    assert home.writes() == 0, "nothing is written back to where the change was made"
    cost = c.svc.call("GET", "/api/status")[1]["recent_check"][
        "cost_per_minute_per_person_and_server"
    ]
    # One request per check; a check that ran while the plays were arriving may have read a
    # second page (its list moved under it), so the average is a little over one, never two.
    assert 60 / every <= cost["requests"] < 1.5 * 60 / every and 0 < cost["bytes"], cost
    journal = c.svc.call("GET", "/api/journal?limit=20")[1]
    causes = {e.get("cause", "") for e in journal["entries"]}
    assert causes and all(cause.startswith("check:") for cause in causes), causes
    # Home keeps changing and posting nothing: the third finding names the silent plugin.
    home.user_marks("alice", "Heat", True)
    eventually(lambda: parents.ud("alice", "Heat")["Played"], what="Heat played on parents")
    home.user_plays("bob", "Arrival", [10**10], completed=True)
    eventually(lambda: parents.ud("bob", "Arrival")["Played"], what="bob's Arrival on parents")
    cards = {
        s["name"]: s for s in eventually(lambda: silent_cards(c), what="the silent-plugin warning")
    }
    said = cards["home"]["plugin_silent"]
    assert said.startswith("the Webhook plugin on home is not posting to us"), said
    for words in (
        "installed",
        "/webhook/home",
        "Send All Properties",
        "Playback Stop",
        "User Data Saved",
    ):
        assert words in said, words
    assert cards["parents"]["plugin_silent"] is None and cards["public"]["plugin_silent"] is None
    alert = eventually(lambda: receiver.bodies("/hook"), what="an alert")[0]
    assert alert["condition"] == "silent:home" and alert["level"] == "problem", alert
    assert alert["title"] == "the Webhook plugin on home is not posting to us"
    # The plugin is mended: its next webhook clears the card and the alert.
    home.webhook_url = f"{c.svc.url}/webhook/home"
    home.user_favourites("alice", "Heat", True)
    eventually(lambda: not silent_cards(c), what="the warning cleared")
    eventually(
        lambda: [b for b in receiver.bodies("/hook") if b["level"] == "resolved"],
        what="the all-clear",
    )
    eventually(lambda: parents.ud("alice", "Heat")["IsFavorite"], what="the webhook's change")


def silent_cards(c: Cluster) -> list[dict]:
    servers = c.svc.call("GET", "/api/status")[1]["servers"]
    return servers if any(s["plugin_silent"] for s in servers) else []


def test_the_recent_check_is_off_at_zero_and_reads_nothing(cluster):
    c = cluster()  # the tests' config: reconcile.recent_check_seconds: 0
    assert c.svc.call("GET", "/api/status")[1]["recent_check"] == {"every_seconds": 0}
    assert c.svc.service.recent_check.thread is None
    c.settle()
    assert [f.date_played_reads for f in c.fakes] == [0, 0, 0]


def test_the_recent_check_reads_a_jellyfin_10_8_source_by_its_legacy_route(cluster):
    c = cluster(
        versions=("10.8.13", "10.10.7", "10.11.8"),
        extra={"reconcile": {"recent_check_seconds": 0.2}},
    )
    home, parents = c["home"], c["parents"]
    recent_rounds(c, 1)
    home.webhook_url = None  # a server without the plugin (it may lag a new Jellyfin)
    runtime = home.items[home.item("Dune")]["RunTimeTicks"]
    home.user_plays("alice", "Heat", [10**10], completed=True)
    home.user_plays("alice", "Dune", [runtime // 3])
    eventually(lambda: parents.ud("alice", "Heat")["Played"], what="Heat played on parents")
    eventually(
        lambda: parents.ud("alice", "Dune")["PlaybackPositionTicks"] == runtime // 3,
        what="Dune's position",
    )
    assert ("GET", f"/Users/{home.user('alice')}/Items") in home.requests


def test_plays_made_while_the_service_restarted_arrive_by_the_check_after_it(cluster):
    c = cluster(extra={"reconcile": {"recent_check_seconds": 0.2}})
    home, parents = c["home"], c["parents"]
    recent_rounds(c, 1)
    c.svc.stop()  # "docker restart": the plugin's webhooks meanwhile are refused, never resent
    runtime = home.items[home.item("Heat")]["RunTimeTicks"]
    home.user_plays("alice", "Arrival", [10**10], completed=True)
    home.user_plays("alice", "Heat", [runtime // 4])
    eventually(home.quiet, what="the lost webhooks")
    assert not parents.ud("alice", "Arrival")["Played"]
    c.start()  # the same database: the watermark says where the last check stopped
    eventually(lambda: parents.ud("alice", "Arrival")["Played"], what="Arrival played on parents")
    eventually(
        lambda: parents.ud("alice", "Heat")["PlaybackPositionTicks"] == runtime // 4,
        what="Heat's position",
    )
    c.settle()
    assert home.writes() == 0


def test_a_film_finished_after_another_started_still_arrives_by_the_check(cluster):
    """Jellyfin dates a play from its start: a film the check saw half way, finished once the
    same person had started something else (seen by a check too), is older than the watermark."""
    c = cluster(extra={"reconcile": {"recent_check_seconds": 0.2}})
    home, parents = c["home"], c["parents"]
    recent_rounds(c, 1)
    home.webhook_url = None
    runtime = home.items[home.item("Dune")]["RunTimeTicks"]
    home.user_plays("alice", "Dune", [runtime // 3])
    eventually(
        lambda: parents.ud("alice", "Dune")["PlaybackPositionTicks"] == runtime // 3,
        what="Dune half way",
    )
    home.user_plays("alice", "Heat", [runtime // 5])  # on another device
    eventually(
        lambda: parents.ud("alice", "Heat")["PlaybackPositionTicks"] == runtime // 5,
        what="Heat started",
    )
    # Dune's player reaches the end: saved with no new PlaybackStart
    # (UserDataManager.UpdatePlayState).
    home.save(
        home.user("alice"),
        home.item("Dune"),
        "PlaybackFinished",
        Played=True,
        PlaybackPositionTicks=0,
    )
    eventually(lambda: parents.ud("alice", "Dune")["Played"], what="Dune played on parents")


# ── Issue 25: intake while distinct changes are written ──────────────────────


def test_a_burst_of_webhooks_goes_first_yet_its_changes_reach_both_servers_while_it_lasts(
    cluster, monkeypatch
):
    """Senders keep a burst of webhooks going; the planner and the writers yield to it (intake
    first), but each only for a while at a time: changes sent during the burst reach both other
    servers while it still lasts, and none is lost. (Here any two webhooks within a second make
    a burst, so the test does not depend on how fast this machine is.)"""
    monkeypatch.setattr(jds, "INTAKE_BURST_ROWS", 2)
    monkeypatch.setattr(jds, "INTAKE_BURST_SECONDS", 1.0)
    c = cluster(start=False)
    for f in c.fakes:
        f.add_library(40)
    svc = c.start()
    home = c["home"]
    bob, heat = home.user("bob"), home.item("Heat")
    stop = threading.Event()

    def sender(k: int) -> None:  # bob watching Heat, a progress report after another
        client = LeanClient(svc.port)
        n = 0
        while not stop.is_set():
            n += 1
            ud = dict(home.ud(bob, heat), PlaybackPositionTicks=(k * 10**6 + n) * 10**4)
            client.post(
                "/webhook/home",
                json.dumps(home.payload("PlaybackProgress", bob, heat, ud)).encode(),
            )
        client.close()

    senders = [threading.Thread(target=sender, args=(k,), daemon=True) for k in range(4)]
    for t in senders:
        t.start()
    try:
        eventually(svc.store.intake_burst, what="the burst to start")
        alice = home.user("alice")
        for i in range(40):
            assert (
                svc.call(
                    "POST", "/webhook/home", home.played_payload(alice, home.item(f"Film {i}"))
                )[0]
                == 202
            )
        burst_on: list[bool] = []

        def arrived() -> bool:
            burst_on.append(svc.store.intake_burst())
            return all(
                c[t].ud("alice", f"Film {i}")["Played"]
                for t in ("parents", "public")
                for i in range(40)
            )

        eventually(arrived, 60, 0.05, "the 40 changes on both other servers")
        assert burst_on[-1], "the changes arrived while the burst still lasted"
    finally:
        stop.set()
        for t in senders:
            t.join(10)


# ── Issue 24.1: one registry of synced fields ────────────────────────────────


def test_the_synced_fields_and_their_switches_come_from_one_registry(cluster):
    """/api/fields lists what is synced and whether the config switches it on; a field switched
    off there is not written, while the others of the same click are."""
    c = cluster(extra={"sync": {"favorites": False}})
    status, answer = c.svc.call("GET", "/api/fields")
    assert status == 200
    fields = {f["name"]: f for f in answer["fields"]}
    assert [n for n, f in fields.items() if f["scope"] == "item"] == [
        "played",
        "position",
        "favorite",
        "likes",
    ]
    assert fields["favorite"]["enabled"] is False and fields["likes"]["enabled"] is True
    assert fields["user_rename"] == {
        **fields["user_rename"],
        "scope": "account",
        "label": "account",
    }
    words = c.svc.call("GET", "/api/dashboard")[1]["words"]["field"]
    assert all(words[n] == f["label"] for n, f in fields.items())
    # On home, a heart, then a like: both webhooks (UpdateUserRating) report both fields.
    c["home"].user_favourites("alice", "Heat", True)
    c["home"].user_rates("alice", "Heat", True)
    eventually(
        lambda: c["parents"].ud("alice", "Heat")["Rating"] == 10.0, what="the like on parents"
    )
    # The heart came first and was not queued at all: nothing of it can still be on its way.
    assert not c["parents"].ud("alice", "Heat")["IsFavorite"], "favourites are switched off"


# ── Issue 24.9: the older program's layer in one section ─────────────────────


def test_the_older_programs_layer_has_one_section_and_marked_lines_elsewhere():
    """2.0 may drop the older program's layer by deleting its section and the lines marked
    "Older program" (README, "Moving from the older jellyfin-db-sync"): nothing else may use
    it. And the module's list of sections is the code's."""
    source = Path(jds.__file__).read_text(encoding="utf-8")
    headers = re.findall(r"^# ── (.+?) ─", source, re.M)
    section_list = jds.__doc__.split("Sections,")[1].split("\n\n")[1]
    listed = re.findall(r"^  (\S.*?)\s{2,}\S", section_list, re.M)
    assert listed == headers
    lines = source.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("# ── Older program ")))
    end = lines.index(next(line for line in lines[start + 1 :] if line.startswith("# ── ")))
    uses = r"\b(OLDER_\w+|OlderDatabase|MIGRATED_EVENT|older_(owed|job_keys|log_\w+))\b"
    names = re.compile(uses + r'|kind == "older"')
    unmarked = [
        f"{n + 1}: {line.strip()}"
        for n, line in enumerate(lines)
        if not start <= n < end
        and names.search(line)
        and not any("Older program" in near for near in lines[max(0, n - 1) : n + 2])
    ]
    assert not unmarked, "used outside its section, unmarked:\n" + "\n".join(unmarked)


# ── Issue 24.5: the web layer — JSON answers in one place, security headers on all ──


def test_security_headers_even_on_a_bug_of_ours_and_an_unreadable_request(cluster):
    """The headers are set by the WSGI call around Bottle, not by a Bottle hook: a hook misses
    the 500 page Bottle builds for an unexpected error and the 400 given before Bottle."""
    svc = cluster().svc
    played = json.dumps(fixture("UserDataSaved-played.json"))

    def answer(method: str, path: str, body: str | None = None) -> tuple[int, dict]:
        conn = HTTPConnection("127.0.0.1", svc.port, timeout=10)
        conn.request(method, path, body)
        resp = conn.getresponse()
        resp.read()
        conn.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}

    syncer = svc.service.syncer
    real, syncer.accept_webhook = syncer.accept_webhook, lambda *a: 1 / 0
    try:
        answers = {"a bug of ours": answer("POST", "/webhook/home", played)}
    finally:
        syncer.accept_webhook = real
    answers["a request Bottle never sees"] = answer("GET", "/api/sync-log?item_name=" + "a" * 2000)
    answers["a method not allowed"] = answer("PUT", "/api/status")
    answers["an event list"] = answer("GET", "/api/events/failed")
    answers["no such list"] = answer("GET", "/api/events/retry-all")
    answers["the style sheet"] = answer("GET", "/static/style.css")
    answers["HEAD"] = answer("HEAD", "/api/status")
    statuses = {what: status for what, (status, _) in answers.items()}
    assert statuses == {
        "a bug of ours": 500,
        "a request Bottle never sees": 400,
        "a method not allowed": 405,
        "an event list": 200,
        "no such list": 405,
        "the style sheet": 200,
        "HEAD": 200,
    }
    for what, (_, headers) in answers.items():
        assert "frame-ancestors 'none'" in headers.get("content-security-policy", ""), what
        assert headers.get("x-frame-options") == "DENY", what
        assert headers.get("x-content-type-options") == "nosniff", what
        assert headers.get("referrer-policy") == "same-origin", what


def test_routes_answer_json_with_their_status_lists_included(cluster):
    """A route returns its data, or (data, status): one place makes it JSON, lists too."""
    c = cluster(extra={"server": {"api_token": TOKEN}})
    svc, bearer = c.svc, {"Authorization": f"Bearer {TOKEN}"}
    for state in ("pending", "waiting", "failed"):
        assert svc.call("GET", f"/api/events/{state}") == (200, []), state
    assert svc.call("GET", "/api/held") == (200, {"held": []})
    status, said = svc.call("POST", "/api/events/12345/retry", headers=bearer)
    assert status == 404 and said["success"] is False
    as_json = {**bearer, "Content-Type": "application/json"}
    status, said = svc.call("POST", "/api/held/apply", {}, as_json)
    assert status == 400 and "give source" in said["error"]
    assert svc.call("POST", "/api/held/forget", {}, bearer)[0] == 404
    assert svc.call("GET", "/webhook/queue") == (200, {"pending_events": 0, "worker_running": True})


# ── Issue 26.1/26.5: hearts on shows and albums, music ───────────────────────

EVERY_VERSION = ("10.8.13", "10.9.11", "10.10.7", "10.11.8", "12.0.0")  # each one the fake offers


def pair(version: str) -> tuple[str, str]:
    """``version`` on home, and another version on parents."""
    return version, "12.0.0" if version != "12.0.0" else "10.10.7"


def shows_and_music(c: Cluster) -> None:
    """On every server, as each one names its own things: a show with a season (no folder of
    its own) and an episode, an artist with an album and a song, another album, a collection.
    Shows sit in other folders (found by their TVDB id); artists and collections live in each
    server's data folder (found by name and year); the music folder is shared (found by path)."""
    for n, f in enumerate(c.fakes):
        data = f"/var/lib/jellyfin-{f.name}"
        show = f.add_item(
            "Lost", "Series", f"/tv{n}/Lost", provider_ids={"Tvdb": "73739"}, year=2004
        )
        f.add_item("Season 1", "Season", None, series_id=show, episode=1)
        f.add_item(
            "Pilot", "Episode", f"/tv{n}/Lost/S01E01.mkv", series_id=show, season=1, episode=1
        )
        f.add_item("Miles Davis", "MusicArtist", f"{data}/metadata/artists/Miles Davis")
        f.add_item("Kind of Blue", "MusicAlbum", "/music/Miles Davis/Kind of Blue", year=1959)
        for number, song in ((1, "So What"), (2, "Freddie Freeloader")):
            path = f"/music/Miles Davis/Kind of Blue/0{number} {song}.flac"
            f.add_item(song, "Audio", path, runtime=9 * MIN, year=1959)
        f.add_item("Blue Train", "MusicAlbum", f"/music{n}/John Coltrane/Blue Train", year=1957)
        boxset_ids = {"Tmdb": "8091"} if n == 0 else {}  # only home's has found its TMDb id
        f.add_item(
            "Alien Collection",
            "BoxSet",
            f"{data}/data/collections/Alien Collection [boxset]",
            provider_ids=boxset_ids,
        )


def while_down(c: Cluster) -> None:
    """The service stops; what people do meanwhile reaches it by no webhook."""
    c.svc.stop()
    for f in c.fakes:
        f.webhook_url = None


def journal_fields(c: Cluster, item: str) -> set[str]:
    """The fields written on the item called exactly ``item`` (the search finds parts of names)."""
    return {e["field"] for e in journal(c) if e["item_name"] == item}


@pytest.mark.parametrize("version", EVERY_VERSION)
def test_a_heart_on_a_show_made_while_the_service_was_down_reaches_the_other_at_the_next_pass(
    cluster, version
):
    c = cluster(versions=pair(version), users=("alice",), start=False)
    home, parents = c["home"], c["parents"]
    shows_and_music(c)
    c.start()
    assert reconcile(c)["changes"] == 0
    while_down(c)
    home.user_favourites("alice", "Lost", True)
    home.user_marks("alice", "Pilot", True)  # every episode watched: home says the show is played
    parents.user_favourites("alice", "Season 1", True)
    parents.user_rates("alice", "Lost", True)
    c.start()
    report = reconcile(c)
    assert not report["errors"], report
    for f in c.fakes:
        assert f.ud("alice", "Lost")["IsFavorite"] and f.ud("alice", "Season 1")["IsFavorite"], (
            f.name
        )
        assert f.ud("alice", "Lost")["Rating"] == 10.0, f.name
        assert f.ud("alice", "Pilot")["Played"], f.name
    # Only what a person sets on a folder travels: its heart and rating, never "played" (which
    # Jellyfin sums from the episodes, and writing it would mark every episode).
    assert journal_fields(c, "Lost") == {"favorite", "likes"}
    assert journal_fields(c, "Lost — Season 1") == {"favorite"}
    assert reconcile(c)["changes"] == 0, "in step"
    # The inspector finds the show and shows what travels for it, the same on both servers.
    status, found = c.svc.call("GET", "/api/inspect?q=lost&person=alice")
    assert status == 200 and found["item"]["type"] == "Series", found
    assert [f["name"] for f in found["fields"]] == ["favorite", "likes"] and found[
        "different"
    ] == [], found


@pytest.mark.parametrize("version", EVERY_VERSION)
def test_hearts_on_albums_artists_and_collections_reach_the_other_server_at_the_next_pass(
    cluster, version
):
    c = cluster(versions=pair(version), users=("alice",), start=False)
    home, parents = c["home"], c["parents"]
    shows_and_music(c)
    c.start()
    reconcile(c)
    while_down(c)
    home.user_favourites("alice", "Miles Davis", True)  # an artist: found on parents by name
    home.user_favourites("alice", "Blue Train", True)  # an album in another folder: name and year
    home.user_rates("alice", "Kind of Blue", True)  # an album in the same folder: its path
    parents.user_favourites("alice", "Alien Collection", True)  # a collection: name (and year)
    c.start()
    report = reconcile(c)
    assert not report["errors"] and report["changes"] == 4, report
    for f in c.fakes:
        assert (
            f.ud("alice", "Miles Davis")["IsFavorite"] and f.ud("alice", "Blue Train")["IsFavorite"]
        ), f.name
        assert f.ud("alice", "Alien Collection")["IsFavorite"], f.name
        assert f.ud("alice", "Kind of Blue")["Rating"] == 10.0, f.name
    # The inspector says how each was found.
    status, found = c.svc.call(
        "GET", "/api/inspect?" + urllib.parse.urlencode({"q": "Miles Davis"})
    )
    assert status == 200 and found["item"]["type"] == "MusicArtist", found
    assert [s["matched_by"] for s in found["servers"]] == ["this item", "same name and year"], found
    # A heart taken away travels too, through the brake like any removal.
    while_down(c)
    parents.user_favourites("alice", "Miles Davis", False)
    c.start()
    assert reconcile(c)["changes"] == 1
    assert not home.ud("alice", "Miles Davis")["IsFavorite"]


def test_export_then_import_carries_a_shows_heart(cluster):
    c = cluster(versions=("10.10.7", "10.8.13"), users=("alice",), start=False)
    home, parents = c["home"], c["parents"]
    shows_and_music(c)
    quietly(home, "alice", "Lost", IsFavorite=True, Played=True, PlayCount=1)
    quietly(home, "alice", "Season 1", Rating=10.0)
    quietly(home, "alice", "Miles Davis", IsFavorite=True)
    out = c.tmp / "history.json"
    assert run_cli("--config", str(c.config_path), "--export", str(out)).returncode == 0
    items = {e["name"]: e for e in json.loads(out.read_text())["people"]["alice"]["home"]}
    assert items["Lost"] == {
        "name": "Lost",
        "type": "Series",
        "year": 2004,
        "path": "/tv0/lost",
        "ids": {"tvdb": "73739"},
        "favorite": True,
        "likes": None,
    }, "a show keeps its heart and rating, not the played state Jellyfin sums from its episodes"
    assert (
        items["Season 1"]["series"]["ids"] == {"tvdb": "73739"} and items["Season 1"]["season"] == 1
    )
    assert items["Miles Davis"]["type"] == "MusicArtist" and items["Miles Davis"]["favorite"]
    args = ["--config", str(c.config_path), "--import", str(out), "--to", "parents"]
    code, said = said_by(*args)
    assert code == 0 and "alice: 3 items found on parents, 0 not" in said, said
    assert (
        parents.ud("alice", "Lost")["IsFavorite"]
        and parents.ud("alice", "Season 1")["Rating"] == 10.0
    )
    assert parents.ud("alice", "Miles Davis")["IsFavorite"]
    assert not parents.ud("alice", "Lost")["Played"] and not parents.ud("alice", "Pilot")["Played"]


def test_an_undone_heart_on_a_show_stays_undone_and_a_pass_does_not_spread_the_undo(cluster):
    c = cluster(versions=("10.11.8", "10.8.13"), users=("alice",), start=False)
    home, parents = c["home"], c["parents"]
    shows_and_music(c)
    c.start()
    home.user_favourites("alice", "Lost", True)  # a show: the plugin sends this one
    eventually(
        lambda: parents.ud("alice", "Lost")["IsFavorite"], what="the show hearted on parents"
    )
    c.settle()
    entry = journal(c, target="parents", field="favorite", item_name="Lost")[0]
    status, done = undo(c, dry_run=False, id=entry["id"])
    assert status == 202, done
    eventually(lambda: not parents.ud("alice", "Lost")["IsFavorite"], what="the undo on parents")
    c.settle()
    before = snapshot(c)
    report = reconcile(c)
    assert report["changes"] == 0 and not report["errors"], report
    assert snapshot(c) == before
    assert home.ud("alice", "Lost")["IsFavorite"] and not parents.ud("alice", "Lost")["IsFavorite"]
    # Her next heart on it, anywhere, travels as usual.
    home.user_favourites("alice", "Lost", False)
    c.settle()
    home.user_favourites("alice", "Lost", True)
    eventually(lambda: parents.ud("alice", "Lost")["IsFavorite"], what="the new heart on parents")


@pytest.mark.parametrize("version", EVERY_VERSION)
def test_music_plays_and_album_and_artist_hearts_travel_by_webhook_or_by_the_next_pass(
    cluster, version
):
    c = cluster(versions=pair(version), users=("alice",), start=False)
    home, parents = c["home"], c["parents"]
    shows_and_music(c)
    c.start()
    # A song played to the end on home: its webhooks carry played, the count and the date.
    home.user_plays("alice", "So What", [1 * MIN, 4 * MIN], completed=True)
    home.user_favourites("alice", "Kind of Blue", True)  # an album: the plugin sends this one
    home.user_favourites("alice", "Miles Davis", True)  # an artist: the plugin sends nothing
    eventually(lambda: parents.ud("alice", "So What")["Played"], what="the song played on parents")
    eventually(
        lambda: parents.ud("alice", "Kind of Blue")["IsFavorite"],
        what="the album hearted on parents",
    )
    c.settle()
    played, there = home.ud("alice", "So What"), parents.ud("alice", "So What")
    assert there["PlayCount"] == played["PlayCount"] == 1
    assert abs(parse_iso(there["LastPlayedDate"]) - parse_iso(played["LastPlayedDate"])) < 1
    assert not parents.ud("alice", "Miles Davis")["IsFavorite"], "no webhook: waits for a pass"
    report = reconcile(c)
    assert parents.ud("alice", "Miles Davis")["IsFavorite"] and report["changes"] == 1, report
    # Another song played twice on parents while the service was down: the next pass brings
    # played, the count and the date to home, as for a film.
    while_down(c)
    when = iso(time.time() - 3600)
    quietly(parents, "alice", "Freddie Freeloader", Played=True, PlayCount=2, LastPlayedDate=when)
    c.start()
    assert reconcile(c)["changes"] == 1
    song = home.ud("alice", "Freddie Freeloader")
    assert song["Played"] and abs(parse_iso(song["LastPlayedDate"]) - parse_iso(when)) < 1, song
    # 10.8 cannot set a count with an API key: marking played with a date adds one there.
    assert song["PlayCount"] == (1 if home.legacy else 2), song


@pytest.mark.parametrize("version", EVERY_VERSION)
def test_a_heart_on_a_playlist_made_while_the_service_was_down_reaches_the_other_server(
    cluster, version
):
    c = cluster(
        versions=pair(version),
        users=("alice", "bob"),
        start=False,
        extra={"sync": {"playlists": False}},
    )
    home, parents = c["home"], c["parents"]
    mine = home.add_playlist("alice", "Road trip", ["Arrival", "Heat"])
    theirs = parents.add_playlist("alice", "Road trip", ["Arrival", "Heat"])
    # Two people's "Mix" on parents: bob's came first and has the path alice's has on home.
    mix = home.add_playlist("alice", "Mix", ["Dune"])
    bobs = parents.add_playlist("bob", "Mix", ["Heat"])
    alices = parents.add_playlist("alice", "Mix", ["Dune"])
    c.start()
    reconcile(c)
    while_down(c)
    quietly(home, "alice", mine, IsFavorite=True)  # the plugin sends nothing for a playlist
    quietly(home, "alice", mix, IsFavorite=True)
    c.start()
    report = reconcile(c)
    assert report["changes"] == 1 and not report["errors"], report
    assert parents.ud("alice", theirs)["IsFavorite"]
    assert journal_fields(c, "Road trip") == {"favorite"}
    # Which "Mix" is hers cannot be told by name, and the path is bob's: left alone, not guessed.
    assert (
        not parents.ud("alice", bobs)["IsFavorite"]
        and not parents.ud("alice", alices)["IsFavorite"]
    )


@pytest.mark.parametrize("version", EVERY_VERSION)
def test_a_heart_on_a_season_travels_by_its_webhook_to_that_season_of_the_show(cluster, version):
    c = cluster(versions=pair(version), users=("alice",), start=False)
    home, parents = c["home"], c["parents"]
    shows_and_music(c)
    c.start()
    home.user_favourites("alice", "Season 1", True)  # a season: the plugin sends this one
    eventually(
        lambda: parents.ud("alice", "Season 1")["IsFavorite"], what="the season hearted on parents"
    )
    c.settle()
    assert journal_fields(c, "Lost — Season 1") == {"favorite"}
    assert not parents.ud("alice", "Lost")["IsFavorite"], "the season, not its show"


def test_the_set_up_webhooks_carry_hearts_on_shows_seasons_and_albums(cluster):
    """With the plugin set up by the service (nothing by hand), the plugin sends shows, seasons
    and albums too: their hearts travel at once, not only at the next pass."""
    c = cluster(versions=("10.9.11", "10.11.8"), users=("alice",), start=False)
    home, parents = c["home"], c["parents"]
    shows_and_music(c)
    svc = c.start()
    for f in c.fakes:
        f.webhook_url = None  # nobody has configured the plugin by hand
        status, answer = svc.call(
            "POST",
            f"/api/servers/{f.name}/setup-webhook",
            {"public_url": svc.url},
            {"Content-Type": "application/json"},
        )
        assert status == 200 and answer["result"] == "added", answer
    home.user_favourites("alice", "Lost", True)
    home.user_favourites("alice", "Season 1", True)
    home.user_rates("alice", "Kind of Blue", True)
    parents.user_favourites("alice", "Blue Train", True)
    eventually(
        lambda: parents.ud("alice", "Lost")["IsFavorite"], what="the show hearted on parents"
    )
    eventually(
        lambda: parents.ud("alice", "Season 1")["IsFavorite"], what="the season hearted on parents"
    )
    eventually(
        lambda: parents.ud("alice", "Kind of Blue")["Rating"] == 10.0,
        what="the album liked on parents",
    )
    eventually(
        lambda: home.ud("alice", "Blue Train")["IsFavorite"], what="the album hearted on home"
    )
    c.settle()
    assert {e["cause"].split(":")[0] for e in journal(c)} == {"event"}, "by webhook, no pass"


def test_a_file_of_the_release_before_learns_the_albums_at_its_first_start(cluster, tmp_path):
    """Upgrading: the release before indexed playable items and shows only, and its index was
    up to date; the first start reads each server's whole index again, so an album hearted
    before the upgrade is found on the other server at the next pass."""
    c = cluster(versions=("10.10.7", "12.0.0"), users=("alice",), start=False)
    home, parents = c["home"], c["parents"]
    shows_and_music(c)
    for f in c.fakes:
        for row in f.items.values():
            row["_saved"] = time.time() - 86400  # scanned yesterday: no incremental read brings it
    db = c.config.database_path
    conn = jds.sqlite3.connect(str(db))
    conn.executescript((HERE / "fixtures" / "schemas" / "v5.sql").read_text())
    conn.execute("INSERT INTO meta VALUES ('schema_version', '5')")
    for f in c.fakes:
        conn.execute("INSERT INTO meta VALUES (?, ?)", (f"index_watermark:{f.name}", iso()))
    conn.commit()
    conn.close()
    quietly(home, "alice", "Blue Train", IsFavorite=True)
    c.start()
    report = reconcile(c)
    assert not report["errors"] and parents.ud("alice", "Blue Train")["IsFavorite"], report
    fresh = tmp_path / "fresh.db"
    jds.Store(str(fresh)).close()
    assert schema_of(db) == schema_of(fresh)


# ── A title with accents, searched for in the journal and the sync log ───────


def test_a_title_with_accents_is_found_in_the_journal_and_the_sync_log(cluster):
    c = cluster()
    for f in (c["home"], c["parents"]):
        f.add_item("Amélie — le film", "Movie", "/media/movies/Amelie.mkv")
        c.svc.service.library.refresh_index(f.name, full=True)
    c["home"].user_marks("alice", "Amélie — le film", True)
    eventually(
        lambda: c["parents"].ud("alice", "Amélie — le film")["Played"], what="played on parents"
    )
    query = urllib.parse.urlencode({"item_name": "Amélie", "target": "parents"})
    for path in (f"/api/journal?{query}", f"/api/sync-log?{query}"):
        status, page = c.svc.call("GET", path)
        assert status == 200 and [e["item_name"] for e in page["entries"]] == [
            "Amélie — le film"
        ], (path, page)


# ── Issue 26.2: preferences follow the person ───────────────────────────────

# The library-id lists and the display choices a UserConfiguration also holds: never copied.
NOT_OURS = (
    "OrderedViews",
    "GroupedFolders",
    "MyMediaExcludes",
    "LatestItemsExcludes",
    "DisplayMissingEpisodes",
    "HidePlayedInLatest",
)


def settings_of(c: Cluster, user: str = "alice") -> dict[str, dict]:
    return {f.name: f.configuration(user) for f in c.fakes}


@pytest.mark.parametrize(
    "versions",
    [
        ("10.8.13", "10.9.11", "10.10.7"),  # a 10.8 source: read there, written on the others
        ("10.9.11", "10.10.7", "10.11.8"),
        ("10.11.8", "12.0.0", "10.9.11"),
    ],
)
def test_a_subtitle_language_set_on_home_follows_by_a_pass_and_an_undo_stays(cluster, versions):
    c = cluster(versions=versions)
    home, parents, public = c["home"], c["parents"], c["public"]
    parents.user_sets(
        "alice", DisplayMissingEpisodes=True, HidePlayedInLatest=False
    )  # theirs alone
    reconcile(c)  # first sight: everyone's defaults agree, nothing to write
    assert [f.configuration_writes for f in c.fakes] == [0, 0, 0]
    before = settings_of(c)
    home.user_sets("alice", SubtitleLanguagePreference="fre")
    report = reconcile(c)
    assert report["changes"] == 2, report
    for f in (parents, public):
        now = f.configuration("alice")
        assert now["SubtitleLanguagePreference"] == "fre", f.name
        assert now == {**before[f.name], "SubtitleLanguagePreference": "fre"}, (
            f"only that field on {f.name}"
        )
        assert [now[k] for k in NOT_OURS] == [before[f.name][k] for k in NOT_OURS]
        assert f.configuration("bob")["SubtitleLanguagePreference"] == "", (
            "another person's settings"
        )
    assert home.configuration_writes == 0, "nothing written back where it was made"
    entry = journal(c, target="parents", field="subtitle_language")[0]
    assert (entry["item_name"], entry["old"], entry["new"]) == (
        "subtitle language",
        "none",
        "fre",
    ), entry
    assert entry["before"] == {"subtitle_language": ""} and entry["after"] == {
        "subtitle_language": "fre"
    }
    feed = c.svc.call("GET", "/api/sync-log?target=parents&result=ok")[1]["entries"][0]
    assert feed["field_word"] == "subtitle language" and (feed["old"], feed["new"]) == (
        "none",
        "fre",
    )
    # Undo that one entry: parents gets its old value back; the others keep French.
    status, preview = undo(c, id=entry["id"])
    assert status == 200 and preview["servers"]["parents"]["undo"] == 1, preview
    assert preview["servers"]["parents"]["sample"] == ["alice: subtitle language: fre → none"], (
        preview
    )
    assert preview["afterwards"] == {
        "home": ["alice: subtitle language: fre (as now)"],
        "parents": ["alice: subtitle language: none (put back)"],
        "public": ["alice: subtitle language: fre (as now)"],
    }, preview
    status, done = undo(c, dry_run=False, id=entry["id"])
    assert status == 202, done
    eventually(
        lambda: parents.configuration("alice")["SubtitleLanguagePreference"] == "", what="the undo"
    )
    c.settle()
    assert parents.configuration("alice") == before["parents"], (
        "the undo, too, changes only that field"
    )
    reconcile(c)  # a later pass does not spread French back to parents, nor the undo to the others
    assert parents.configuration("alice")["SubtitleLanguagePreference"] == ""
    assert home.configuration("alice")["SubtitleLanguagePreference"] == "fre"
    assert public.configuration("alice")["SubtitleLanguagePreference"] == "fre"
    # The person changes it again on home: that change goes everywhere, parents included.
    home.user_sets("alice", SubtitleLanguagePreference="ger")
    reconcile(c)
    assert [f.configuration("alice")["SubtitleLanguagePreference"] for f in c.fakes] == ["ger"] * 3


def test_a_preference_changed_on_home_arrives_within_the_recent_check_and_then_costs_nothing(
    cluster,
):
    c = cluster(
        versions=("10.10.7", "10.9.11", "12.0.0"),
        extra={"reconcile": {"recent_check_seconds": 0.2}},
    )
    home, parents, public = c["home"], c["parents"], c["public"]
    recent_rounds(c, 1)
    before = settings_of(c)
    home.user_sets(
        "alice",
        AudioLanguagePreference="jpn",
        SubtitleMode="Always",
        EnableNextEpisodeAutoPlay=False,
    )
    wanted = {
        "AudioLanguagePreference": "jpn",
        "SubtitleMode": "Always",
        "EnableNextEpisodeAutoPlay": False,
    }
    for f in (parents, public):
        eventually(
            lambda f=f: f.configuration("alice") == {**before[f.name], **wanted},
            what=f"on {f.name}",
        )
    c.settle()
    entries = journal(c, target="public")
    assert {(e["item_name"], e["old"], e["new"]) for e in entries} == {
        ("audio language", "none", "jpn"),
        ("subtitle mode", "default", "always"),
        ("play next episode automatically", "on", "off"),
    }, entries
    assert all(e["cause"].startswith("check:") for e in entries), entries
    # In step: later rounds read each server's users once and write nothing.
    writes = [f.configuration_writes for f in c.fakes]
    reads = [f.requests.count(("GET", "/Users")) for f in c.fakes]
    recent_rounds(c, 2)
    assert [f.configuration_writes for f in c.fakes] == writes
    assert all(
        f.requests.count(("GET", "/Users")) - n <= 3 for f, n in zip(c.fakes, reads, strict=True)
    )


def test_a_jellyfin_10_8_server_is_read_but_never_written(cluster):
    c = cluster(versions=("10.11.8", "10.8.13", "12.0.0"))
    home, parents, public = c["home"], c["parents"], c["public"]
    home.user_sets("alice", SubtitleLanguagePreference="fre")  # set before we first look
    reconcile(c)
    assert public.configuration("alice")["SubtitleLanguagePreference"] == "fre"
    home.user_sets("alice", AudioLanguagePreference="eng")
    report = reconcile(c)
    assert public.configuration("alice")["AudioLanguagePreference"] == "eng"
    assert "AudioLanguagePreference" not in parents.configuration("alice")
    assert parents.configuration_writes == 0 and list(report["users"]["alice"]) == ["public"], (
        report
    )
    card = next(s for s in c.svc.call("GET", "/api/status")[1]["servers"] if s["name"] == "parents")
    assert any("preferences cannot be written" in line for line in card["limits"]), card
    # A change made on the 10.8 server still goes to the others — the audio language too,
    # which it never took from home.
    parents.user_sets("alice", PlayDefaultAudioTrack=False, AudioLanguagePreference="spa")
    parents.user_sets("alice", SubtitleLanguagePreference="ita")
    reconcile(c)
    assert [f.configuration("alice")["SubtitleLanguagePreference"] for f in c.fakes] == ["ita"] * 3
    assert not home.configuration("alice")["PlayDefaultAudioTrack"]
    assert not public.configuration("alice")["PlayDefaultAudioTrack"]
    assert home.configuration("alice")["AudioLanguagePreference"] == "spa"
    assert public.configuration("alice")["AudioLanguagePreference"] == "spa"


def test_first_sight_a_set_preference_wins_different_ones_are_left_alone_and_said(cluster):
    c = cluster()
    home, parents, public = c["home"], c["parents"], c["public"]
    home.user_sets("alice", AudioLanguagePreference="fre", SubtitleLanguagePreference="eng")
    parents.user_sets("alice", AudioLanguagePreference="ger")
    report = reconcile(c)
    # Subtitles: set on home only → everywhere. Audio: French and German → nobody's is chosen.
    assert [f.configuration("alice")["SubtitleLanguagePreference"] for f in c.fakes] == ["eng"] * 3
    assert [f.configuration("alice").get("AudioLanguagePreference") for f in c.fakes] == [
        "fre",
        "ger",
        None,
    ]
    assert any("audio language differs" in note for note in report["notes"]), report
    reconcile(c)
    assert public.configuration("alice").get("AudioLanguagePreference") is None, "still left alone"
    # The person chooses on one server: that choice follows everywhere.
    parents.user_sets("alice", AudioLanguagePreference="spa")
    reconcile(c)
    assert [f.configuration("alice")["AudioLanguagePreference"] for f in c.fakes] == ["spa"] * 3
    # Changed on two servers between two passes: the first in the config's order wins.
    public.user_sets("alice", SubtitleLanguagePreference="ita")
    home.user_sets("alice", SubtitleLanguagePreference="por")
    reconcile(c)
    assert [f.configuration("alice")["SubtitleLanguagePreference"] for f in c.fakes] == ["por"] * 3


def test_with_preferences_switched_off_nothing_is_written(cluster):
    c = cluster(preferences=False, extra={"reconcile": {"recent_check_seconds": 0.2}})
    home = c["home"]
    recent_rounds(c, 1)
    home.user_sets("alice", SubtitleLanguagePreference="fre", RememberAudioSelections=False)
    recent_rounds(c, 2)
    reconcile(c)
    assert [f.configuration_writes for f in c.fakes] == [0, 0, 0]
    assert c["parents"].configuration("alice")["SubtitleLanguagePreference"] == ""
    fields = {f["name"]: f for f in c.svc.call("GET", "/api/fields")[1]["fields"]}
    assert fields["subtitle_language"] == {
        "name": "subtitle_language",
        "label": "subtitle language",
        "scope": "person",
        "show": "value",
        "enabled": False,
    }


def test_a_preference_owed_to_a_server_that_is_away_goes_when_it_answers_and_dry_run_writes_nothing(
    cluster,
):
    c = cluster(extra={"reconcile": {"recent_check_seconds": 0.2}})
    home, parents, public = c["home"], c["parents"], c["public"]
    recent_rounds(c, 1)
    parents.go_away()
    home.user_sets("alice", RememberSubtitleSelections=False)
    eventually(
        lambda: not public.configuration("alice")["RememberSubtitleSelections"], what="on public"
    )
    parents.come_back()
    eventually(
        lambda: not parents.configuration("alice")["RememberSubtitleSelections"],
        30,
        what="on parents",
    )
    c.settle()
    # sync.dry_run: decided and logged once, written nowhere — not again at every round.
    c.svc.stop()
    c.config = dataclasses.replace(c.config, sync=dataclasses.replace(c.config.sync, dry_run=True))
    c.start()
    recent_rounds(c, 1)
    home.user_sets("alice", SubtitleMode="OnlyForced")
    dry = lambda: journal_rows(c, "dry_run")  # noqa: E731
    eventually(lambda: len(dry()) == 2, what="the dry run's two decisions")
    recent_rounds(c, 3)
    assert len(dry()) == 2, dry()
    assert (
        parents.configuration("alice")["SubtitleMode"]
        == public.configuration("alice")["SubtitleMode"]
        == "Default"
    )


def journal_rows(c: Cluster, result: str) -> list[dict]:
    entries = c.svc.call("GET", f"/api/sync-log?result={result}&limit=100")[1]["entries"]
    return [e for e in entries if e["field"] in jds.PREFERENCES]


def test_a_failed_preference_write_is_retried_by_the_next_pass_and_then_shown_resolved(
    cluster, monkeypatch
):
    monkeypatch.setattr(jds, "HEALTH_CHECK_SECONDS", 0.3)  # each check also looks at what failed
    c = cluster(max_retries=0)
    home, parents = c["home"], c["parents"]
    reconcile(c)
    parents.writes_fail_items = {"/Users/Configuration"}  # parents answers, but refuses this write
    home.user_sets("alice", SubtitleLanguagePreference="fre")
    reconcile(c)
    failed = eventually(
        lambda: [r for r in problem_rows(c)[1] if r["state"] == "failed"], what="a failed write"
    )
    assert failed[0]["fields"] == ["subtitle_language"], failed
    assert c["public"].configuration("alice")["SubtitleLanguagePreference"] == "fre", (
        "the others are not held up"
    )
    parents.writes_fail_items = set()
    reconcile(c)  # no change since, but the servers disagree: the value recorded last (home's) goes
    assert parents.configuration("alice")["SubtitleLanguagePreference"] == "fre"
    eventually(
        lambda: {r["state"] for r in problem_rows(c)[1]} == {"resolved"}, what="shown resolved"
    )
    assert home.configuration("alice")["SubtitleLanguagePreference"] == "fre", "never spread back"


def test_switching_preferences_off_or_clearing_a_language_is_no_removal_for_the_brake(cluster):
    # Removals settle for a minute here and the brake holds a second one: neither may apply.
    c = cluster(extra={"safety": {"brake_items": 1, "removal_delay_seconds": 60}})
    home, parents = c["home"], c["parents"]
    home.user_sets("alice", AudioLanguagePreference="fre")
    reconcile(c)  # reconcile() waits for an empty queue: a minute's settling would time it out
    off = dict(
        PlayDefaultAudioTrack=False, RememberAudioSelections=False, EnableNextEpisodeAutoPlay=False
    )
    home.user_sets("alice", AudioLanguagePreference=None, **off)
    reconcile(c)
    now = parents.configuration("alice")
    assert "AudioLanguagePreference" not in now or now["AudioLanguagePreference"] in ("", None), now
    assert [now[k] for k in off] == [False] * 3, now
    assert c.svc.call("GET", "/api/held")[1]["held"] == [], "nothing held by the brake"


# ── Issue 25.2/25.3: a pass holds a page, not the library ─────────────────────────────────


def test_a_pass_over_more_items_than_a_page_syncs_each_once_and_then_finds_them_in_step(cluster):
    # 1,200 more films everywhere: a pass compares 500 at a time (PASS_PAGE), so the groups of
    # one page are made from home's items and take their matches on the others out of their turn.
    c = cluster(start=False)
    home, parents, public = c["home"], c["parents"], c["public"]
    for f in c.fakes:
        f.add_library(1200)
    day = time.time() - 86400
    for i in range(0, 1200, 2):  # every other film played on home…
        quietly(home, "alice", f"Film {i}", Played=True, PlayCount=1, LastPlayedDate=iso(day + i))
    for i in range(900, 1200):  # …the last 300 on parents (half of them also on home)
        quietly(
            parents, "alice", f"Film {i}", Played=True, PlayCount=1, LastPlayedDate=iso(day + i)
        )
    for i in range(0, 1200, 7):  # and favourites on public only, played nowhere
        if i % 2 and i < 900:
            quietly(public, "alice", f"Film {i}", IsFavorite=True)
    quietly(public, "alice", "Film 3", PlaybackPositionTicks=20 * MIN, LastPlayedDate=iso(day))
    c.start()
    played = {i for i in range(1200) if i % 2 == 0 or i >= 900}
    favourite = {i for i in range(0, 1200, 7) if i % 2 and i < 900}
    first = reconcile(c)
    assert first["errors"] == [], first
    for f in c.fakes:
        got = {i: f.ud("alice", f"Film {i}") for i in range(1200)}
        assert {i for i, ud in got.items() if ud["Played"]} == played, f.name
        assert {i for i, ud in got.items() if ud["IsFavorite"]} == favourite, f.name
        assert got[3]["PlaybackPositionTicks"] == 20 * MIN, f.name
    # Each change was queued once: home's 300 played films parents lacked, parents' 150 home
    # lacked, public's favourites twice over and its one resume point…
    assert first["users"]["alice"]["parents"]["count"] == 450 + len(favourite) + 1
    assert first["users"]["alice"]["home"]["count"] == 150 + len(favourite) + 1
    writes = [f.writes() for f in c.fakes]
    # …and a pass right after finds everyone in step: no change, no write, and no read of an
    # item's own user data (each server's four lists are all it asks for).
    requests = [len(f.requests) for f in c.fakes]
    second = reconcile(c)
    assert second["changes"] == 0 and second["errors"] == [], second
    assert [f.writes() for f in c.fakes] == writes
    for f, n in zip(c.fakes, requests, strict=True):
        reads = {path for _, path in f.requests[n:]}
        assert not any("/UserData" in path for path in reads), (f.name, reads)
    # A change no webhook brought is still found among the in-step items, on any page.
    quietly(parents, "alice", "Film 101", Played=True, PlayCount=1, LastPlayedDate=iso())
    quietly(home, "alice", "Film 2", IsFavorite=True)
    third = reconcile(c)
    assert third["changes"] == 4, third
    for f in c.fakes:
        assert f.ud("alice", "Film 101")["Played"] and f.ud("alice", "Film 2")["IsFavorite"], f.name


def test_a_heart_goes_alone_and_leaves_a_like_the_service_never_saw(cluster):
    """A heart's webhook (UpdateUserRating) carries the item's rating too: none, on home. On
    parents the person liked the film where no webhook reached the service. That "no rating",
    never seen before, is no change: parents keeps its like, the heart costs it two requests
    (read, write) and nothing more, and the next pass brings the like to home."""
    c = cluster()
    home, parents = c["home"], c["parents"]
    plugin, parents.webhook_url = parents.webhook_url, None  # the service hears nothing of it
    parents.user_rates("alice", "Heat", True)
    parents.webhook_url = plugin
    before = len(parents.requests)
    home.user_favourites("alice", "Heat", True)
    eventually(lambda: parents.ud("alice", "Heat")["IsFavorite"], what="the heart on parents")
    c.settle()
    assert parents.ud("alice", "Heat")["Rating"] == 10.0, "the like made unseen is kept"
    heat = parents.item("Heat")
    assert parents.requests[before:] == [
        ("GET", f"/UserItems/{heat}/UserData"),
        ("POST", f"/UserFavoriteItems/{heat}"),
    ]
    reconcile(c)
    assert home.ud("alice", "Heat")["Rating"] == 10.0, "a first sight keeps every mark: the like"
    assert home.ud("alice", "Heat")["IsFavorite"] and parents.ud("alice", "Heat")["IsFavorite"]


# ── Docs walk: --check-config names a server once ─────────────────────────────


def test_check_config_names_a_failing_server_once(tmp_path, fake_servers):
    # A fresh-clone walk read "✗ wan: wan: GET …": the error text already starts with the name.
    import yaml

    fakes = fake_servers(("home", "10.11.8"), ("parents", "10.11.8"))
    cfg = write_config(tmp_path, fakes)
    fakes[1].api_key = "rotated"  # the configured key is refused
    res = run_cli("--check-config", "--config", str(cfg))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "✗ parents: GET /Users: HTTP 401 — the API key was refused" in res.stdout, res.stdout
    assert "parents: parents" not in res.stdout, res.stdout
    data = yaml.safe_load(cfg.read_text())
    data["servers"][1]["url"] = "http://127.0.0.1:1"  # nothing listens there
    cfg.write_text(yaml.safe_dump(data))
    res = run_cli("--check-config", "--config", str(cfg))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "✗ parents: GET /System/Info/Public: cannot connect" in res.stdout, res.stdout
    assert "parents: parents" not in res.stdout, res.stdout


def test_a_pass_names_a_server_that_is_away_once(cluster):
    # The same doubling in a pass's report ("parents: parents: GET /Users: cannot connect").
    c = cluster()
    c["parents"].go_away()
    report = reconcile(c)
    assert any(e.startswith("parents: GET /Users: cannot connect") for e in report["errors"]), (
        report
    )
    assert not any("parents: parents" in e for e in report["errors"]), report["errors"]
    c["parents"].come_back()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
