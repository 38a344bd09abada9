// jellyfin-db-sync dashboard: reads the JSON API every 2 seconds and renders it.
// Everything from the API is inserted as text (item names come from Jellyfin), never as HTML.
"use strict";

const PAGE = 25;
let offset = 0;

// $ and el: dom.js, loaded first.

async function api(path, options) {
  const res = await fetch(path, { cache: "no-store", ...options });
  if (res.status === 401) {  // signed out (or the service restarted): back to the sign-in page
    location.href = "/login";
    throw new Error("sign in first");
  }
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(body.error || body.message || res.statusText);
  return body;
}

async function postJson(path, body) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

function ago(iso) {
  if (!iso) return "never";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(iso).toLocaleString();
}

// The words for our codes come from the API (/api/dashboard's "words", and a *_word beside each
// code): one copy, the service's. Here only their colours.
let WORDS = { result: {}, field: {}, state: {}, chart: {} };
const word = (kind, code) => WORDS[kind][code] || code;
const TONE = { ok: "ok", noop: "muted", failed: "bad", skipped: "warn", absent: "muted", stale: "muted", dry_run: "muted" };

// Once, from the first answer: the filters' choices and the charts' legend in the same words.
function useWords(words) {
  if (WORDS.result.ok) return;
  WORDS = words;
  for (const [id, kind] of [["f-result", "result"], ["f-field", "field"]]) {
    for (const option of $(id).options) if (words[kind][option.value]) option.textContent = words[kind][option.value];
  }
  $("legend").replaceChildren(...["ok", "failed", "other"].flatMap((k) =>
    [el("span", { class: `key ${k}` }), ` ${words.chart[k]} `]));
}

// A time of day (and the date, if not today), for things that happened once.
function clock(iso) {
  const d = new Date(iso);
  return d.toDateString() === new Date().toDateString() ? d.toLocaleTimeString() : d.toLocaleString();
}

// What "Set up webhooks" last said on each server's card (the cards are redrawn every refresh).
const setupNotes = {};
let lastStatus = null;

function webhookLines(s) {
  const hook = `${location.origin}${s.webhook_url_path}`;
  const lines = [];
  if (s.webhook_set_up_at) {
    lines.push(s.awaiting_first_webhook
      ? el("p", { role: "status" }, `Set up at ${clock(s.webhook_set_up_at)}; waiting for the first event`)
      : el("p", {}, `Set up at ${clock(s.webhook_set_up_at)}; first event at ${clock(s.first_webhook_at)}`));
  }
  if (s.last_webhook_at) lines.push(el("p", {}, `Last webhook ${ago(s.last_webhook_at)}`));
  else if (!s.webhook_set_up_at) {
    lines.push(el("p", { class: "warn" }, "No webhook received yet. In this server's Webhook plugin, use the URL ",
      el("code", {}, hook), " with “Send All Properties”, or press “Set up webhooks”."));
  }
  return lines;
}

function renderStatus(st) {
  lastStatus = st;
  const badge = $("overall");
  badge.textContent = st.status;
  badge.className = `badge ${st.status}`;
  $("version").textContent = `v${st.version} · up ${Math.round(st.uptime_seconds / 60)}\u00a0min`;
  // Problems of the pipeline itself (stuck, a thread restarting, database) come first.
  const warnings = [...(st.problems || []).map((p) => `Not syncing: ${p}`), ...st.warnings];
  if (st.dry_run) warnings.push("Dry run: changes are decided and logged, but nothing is written to Jellyfin.");
  if (st.migration) {
    const m = st.migration;
    warnings.push(`Carried over from the older jellyfin-db-sync: ${m.owed} owed change(s) and ${m.history} ` +
      `history line(s); its file is kept as ${m.backup}.`);
  }
  // No sign-in configured: nobody may change anything (the API answers 403), so the buttons that
  // would are hidden (style.css); the warning says what to set.
  document.body.classList.toggle("read-only", !!st.read_only);
  $("warnings").hidden = warnings.length === 0;
  $("warnings").replaceChildren(...warnings.map((w) => el("p", {}, w)));

  const knownServers = st.servers.map((s) => s.name);
  for (const [id, any] of [["f-server", "any"], ["u-server", "any server"], ["u-source", "any server"]]) {
    const sel = $(id);
    if (sel.options.length !== knownServers.length + 1) {
      sel.replaceChildren(el("option", { value: "" }, any), ...knownServers.map((n) => el("option", { value: n }, n)));
    }
  }
  const cards = st.servers.map((s) => {
    const note = setupNotes[s.name];
    const state = s.key_refused ? ["API key refused", "bad"]
      : s.reachable === null ? ["checking…", "muted"] : s.reachable ? ["reachable", "ok"] : ["unreachable", "bad"];
    return el("article", { class: "card", "aria-label": `server ${s.name}` },
      el("h3", {}, s.name, el("span", { class: state[1] }, state[0])),
      el("p", { class: "muted" }, s.url),
      s.version ? el("p", {}, `Jellyfin ${s.version}`, s.latency_ms != null ? ` · ${s.latency_ms}\u00a0ms` : "") : "",
      s.error ? el("p", { class: "bad" }, s.error) : "",
      ...s.limits.map((l) => el("p", { class: "warn" }, l)),
      s.rejected_webhooks && s.rejected_webhooks.count
        ? el("p", { class: "bad", role: "status" },
             `${s.rejected_webhooks.count} webhook(s) refused, the last ${ago(s.rejected_webhooks.last_at)}: ` +
             // A reason may end in its own "?" ("… is this the Jellyfin Webhook plugin?").
             `${s.rejected_webhooks.last_reason.replace(/([^.?!])$/, "$1.")} ${s.rejected_webhooks.hint}`)
        : "",
      s.plugin_silent ? el("p", { class: "bad", role: "status" }, s.plugin_silent) : "",
      el("button", { type: "button", class: "setup-webhook", onclick: () => setupWebhook(s.name),
        ...(note && note.busy ? { disabled: "" } : {}) }, "Set up webhooks"),
      note ? el("p", { class: note.cls, role: "status" }, note.text) : "",
      ...webhookLines(s));
  });
  if (cards.length === 0) cards.push(el("p", { class: "warn" }, "No servers configured: add them to config.yaml."));
  $("servers").replaceChildren(...cards);

  const q = st.queue;
  $("q-pending").textContent = q.pending_events + q.processing_events;
  $("q-waiting").textContent = q.waiting_for_item_events + (q.waiting_for_server_events || 0);
  $("q-failed").textContent = q.failed_events + q.skipped_events;
  $("q-done").textContent = q.changes_last_hour;
}

// A stacked bar chart drawn as SVG (no library): one bar per bucket, written / failed / other,
// with the largest count on the left axis and the time at both ends of the bottom one.
function renderChart(svgId, totalId, tl, labels) {
  const svg = $(svgId);
  const ns = "http://www.w3.org/2000/svg";
  const bucketMs = tl.bucket * 1000;
  const count = Math.round((tl.minutes * 60) / tl.bucket);
  const last = Math.floor(Date.parse(tl.now) / bucketMs);  // the server's clock: the bars it counted
  const [left, top, width, height] = [34, 6, 360, 100];
  const barW = width / count;
  const max = Math.max(1, ...tl.points.map((p) => p.ok + p.failed + p.other));
  const shape = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const parts = [
    shape("line", { x1: left, y1: top + height, x2: left + width, y2: top + height, class: "axis" }),
    shape("line", { x1: left, y1: top, x2: left, y2: top + height, class: "axis" }),
    shape("text", { x: left - 4, y: top + 8, "text-anchor": "end", class: "tick" }, String(max)),
    shape("text", { x: left - 4, y: top + height, "text-anchor": "end", class: "tick" }, "0"),
    shape("text", { x: left, y: top + height + 16, class: "tick" }, labels[0]),
    shape("text", { x: left + width, y: top + height + 16, "text-anchor": "end", class: "tick" }, labels[1]),
  ];
  for (const p of tl.points) {
    const slot = count - 1 - (last - Math.floor(Date.parse(p.minute) / bucketMs));
    if (slot < 0 || slot >= count) continue;
    let y = top + height;
    for (const kind of ["ok", "failed", "other"]) {
      const h = (p[kind] / max) * height;
      if (!h) continue;
      y -= h;
      const bar = shape("rect", { x: (left + slot * barW).toFixed(2), y: y.toFixed(2),
        width: Math.max(barW - 0.6, 0.6).toFixed(2), height: h.toFixed(2), class: kind });
      bar.append(shape("title", {}, `${new Date(Date.parse(p.minute)).toLocaleString()}: ` +
        ["ok", "failed", "other"].map((k) => `${p[k]} ${word("chart", k)}`).join(", ")));
      parts.push(bar);
    }
  }
  svg.replaceChildren(...parts);
  $(totalId).textContent = `(${tl.total} change${tl.total === 1 ? "" : "s"})`;
}

function change(e) {
  if (e.field.startsWith("user_")) return e.new || e.field.replace("user_", "");
  return e.field_word;
}

function renderFeed(log) {
  const rows = log.entries.map((e) => {
    const [label, cls] = [e.result_word, TONE[e.result] || "muted"];
    const fromTo = e.old && e.new ? `${e.old} → ${e.new}` : e.new || e.old || e.detail || "";
    // data-label: on a phone each row is a card, and each value says what it is.
    return el("tr", {},
      el("td", { title: e.at, "data-label": "When" }, ago(e.at)),
      el("td", { "data-label": "User" }, e.username),
      el("td", { "data-label": "Item" }, e.item_name),
      el("td", { "data-label": "Change" }, change(e)),
      el("td", { "data-label": "From → to" }, `${e.source} → ${e.target}`, el("br"), el("span", { class: "muted" }, fromTo)),
      el("td", { class: cls, title: e.detail || "", "data-label": "Result" }, label),
      el("td", { class: "actions" }, ...(e.result === "ok" && e.before ? [
        el("button", { type: "button", "aria-label": `Undo this change of ${e.item_name} on ${e.target}`,
          onclick: () => previewUndo({ id: e.id }, `this change: ${e.item_name} on ${e.target}`) }, "Undo"),
        e.cause ? el("button", { type: "button", title: `everything ${causeName(e.cause)} wrote`,
          onclick: () => previewUndo({ cause: e.cause }, `everything ${causeName(e.cause)} wrote`) }, "Undo all") : "",
      ] : [])));
  });
  $("feed").querySelector("tbody").replaceChildren(...rows);
  $("feed-empty").hidden = log.total > 0;
  if (log.total === 0) {
    $("feed-empty").textContent = log.entries.length === 0 && (filtersActive())
      ? "No syncs match these filters." : "No changes synced yet: they appear here as soon as a server reports one.";
  }
  const what = $("f-result").value === "changes" ? ` change${log.total === 1 ? "" : "s"}` : "";
  $("page").textContent = log.total ? `${offset + 1}–${offset + log.entries.length} of ${log.total}${what}` : "";
  $("prev").disabled = offset === 0;
  $("next").disabled = offset + PAGE >= log.total;
}

function filtersActive() {
  return FEED_FILTERS.some(([key, id]) => key !== "result" && $(id).value) || $("f-result").value !== "changes";
}

const FEED_FILTERS = [["username", "f-user"], ["server", "f-server"], ["item_name", "f-item"], ["field", "f-field"],
  ["since", "f-since"], ["until", "f-until"], ["result", "f-result"]];

// A datetime-local field (the browser's local time) as an ISO time with its offset: UTC.
const isoOf = (value) => (value ? new Date(value).toISOString() : "");

function causeName(cause) {
  const [kind, n] = cause.split(":");
  return { event: `webhook #${n}`, pass: `reconciliation pass ${n}`, undo: `undo ${n}`, import: `import ${n}`,
    discard: `discard ${n}`, "sync-item": `“sync this item” ${n}`, check: `recent check ${n}` }[kind] || cause;
}

// ── The safety net: held changes, undo previews, alerts ──

function renderHeld(groups) {
  $("held-section").hidden = groups.length === 0;
  $("held").replaceChildren(...groups.map((g) => el("article", { class: "card held", "aria-label": g.summary },
    el("h3", {}, g.summary),
    el("p", { class: "muted" }, `arrived ${ago(g.first)}${ago(g.first) === ago(g.last) ? "" : ` – ${ago(g.last)}`}; ` +
      `would be written on ${g.targets.join(", ")}`),
    el("ul", {}, ...g.sample.map((line) => el("li", {}, line)),
      g.changes > g.sample.length ? el("li", { class: "muted" }, `… and ${(g.changes - g.sample.length).toLocaleString()} more`) : ""),
    el("p", { class: "actions" },
      el("button", { type: "button", onclick: () => decideHeld("apply", g) }, "Apply"),
      el("button", { type: "button", onclick: () => decideHeld("discard", g) }, "Discard")),
    el("p", { class: "muted" }, `Apply: they go to ${g.targets.join(", ")}. Discard: they go nowhere, and ${g.source} ` +
      "is put back as the other servers have it."))));
}

async function decideHeld(action, g) {
  const what = action === "apply"
    ? `Apply ${g.changes} held change(s) from ${g.source} for ${g.username}?`
    : `Discard ${g.changes} held change(s) from ${g.source} for ${g.username}, and put ${g.source} back as the others have it?`;
  if (!confirm(what)) return;
  try {
    const res = await postJson(`/api/held/${action}`, { source: g.source, user: g.user });
    if (action === "discard") alert(`${res.discarded} discarded; ${res.restored} put back on ${g.source}.`);
  } catch (err) {
    alert(`Could not ${action}: ${err.message}`);
  }
  refresh();
}

function undoBlock(r, label) {
  const servers = Object.entries(r.servers).map(([name, s]) => el("article", { class: "card" },
    el("h3", {}, name, el("span", { class: s.undo ? "warn" : "muted" }, `${s.undo} to undo`)),
    s.changed_since ? el("p", { class: "ok" }, `${s.changed_since} changed since: kept as they are now`) : "",
    s.already ? el("p", { class: "muted" }, `${s.already} already as before`) : "",
    s.unknown ? el("p", { class: "bad" }, `${s.unknown} could not be checked`) : "",
    el("ul", {}, ...s.sample.map((line) => el("li", {}, line)), ...s.refused.map((line) => el("li", { class: "muted" }, `kept: ${line}`)))));
  // What every server holds afterwards: later passes leave it so, until the person changes it again.
  const after = Object.entries(r.afterwards || {});
  return [
    el("h3", {}, `Undo ${label}`),
    el("p", {}, `${r.entries} journal entr${r.entries === 1 ? "y" : "ies"}; ${r.changes} value(s) to put back.`),
    el("div", { class: "cards" }, ...servers),
    after.length ? el("h4", {}, "Afterwards, each server holds") : "",
    after.length ? el("ul", { "aria-label": "Afterwards" }, ...after.map(([name, lines]) =>
      el("li", {}, el("strong", {}, name), el("ul", {}, ...lines.map((line) => el("li", {}, line)))))) : "",
    after.length ? el("p", { class: "muted" }, "Reconciliation passes leave these as they are; " +
      "the person's next change of them travels as usual.") : "",
  ];
}

async function previewUndo(scope, label) {
  const box = $("undo-preview");
  box.scrollIntoView({ behavior: "smooth", block: "start" });
  try {
    const r = await postJson("/api/undo", { ...scope, dry_run: true });
    const go = el("button", { type: "button", class: "primary", onclick: async () => {
      go.disabled = true;
      try {
        const done = await postJson("/api/undo", { ...scope, dry_run: false });
        box.replaceChildren(el("p", { class: "ok", role: "status" },
          done.undo ? `${done.changes} value(s) queued to be put back (${causeName(done.undo)}).` : "Nothing left to undo."));
      } catch (err) { box.replaceChildren(el("p", { class: "bad" }, err.message)); }
      refresh();
    } }, `Undo ${r.changes} change(s)`);
    go.disabled = r.changes === 0;
    box.replaceChildren(...undoBlock(r, label), el("p", { class: "actions" }, go,
      el("button", { type: "button", onclick: () => box.replaceChildren() }, "Cancel")));
  } catch (err) {
    box.replaceChildren(el("p", { class: "bad" }, err.message));
  }
}

$("undo-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const scope = { user: $("u-user").value.trim(), server: $("u-server").value, source: $("u-source").value,
    since: isoOf($("u-since").value), until: isoOf($("u-until").value) };
  const who = scope.user || "everyone";
  previewUndo(scope, `what was written for ${who}${scope.server ? ` on ${scope.server}` : ""}` +
    `${scope.source ? ` from ${scope.source}` : ""} since ${new Date($("u-since").value).toLocaleString()}`);
});

function renderAlerts(a) {
  if (!a) return;
  const test = el("button", { type: "button", onclick: async () => {
    try {
      const res = await api("/api/alerts/test", { method: "POST" });
      alert(res.results.map((x) => `${x.to}: ${x.ok ? "sent" : x.error}`).join("\n"));
    } catch (err) { alert(`Could not send: ${err.message}`); }
    refresh();
  } }, "Send test");
  test.disabled = a.destinations.length === 0;
  $("alerts").replaceChildren(
    a.destinations.length
      ? el("p", {}, "Sent to ", a.destinations.map((d) => `${d.to} (${d.format})`).join(", "), " ", test)
      : el("p", { class: "muted" }, "No alert destinations: add alerts.urls to the config (ntfy, Gotify, Discord, Slack or any JSON webhook). ", test),
    a.healthchecks ? el("p", { class: "muted" }, `Each pass pings ${a.healthchecks}`) : "",
    ...a.active.map((x) => el("p", { class: "bad" }, `Now: ${x.message}`)),
    ...a.recent.slice(0, 5).map((x) => el("p", { class: "muted" }, `${ago(x.at)}: ${x.title} — ${x.message}`)));
}

// A button's POST; what went wrong is shown, and the page is refreshed either way.
async function post(path, failure) {
  try {
    await api(path, { method: "POST" });
  } catch (err) {
    alert(`${failure}: ${err.message}`);
  }
  refresh();
}

// A row is one action (a click's favourite and the rating it reported): its jobs go together.
const act = async (kind, ids) => { for (const id of ids) await post(`/api/events/${id}/${kind}`, `Could not ${kind}`); };

// Our destination in that server's Webhook plugin, posting to the address this page was
// opened at (what Jellyfin on the same network reaches too, unless server.public_url says else).
// What it said stays on the card, under the button (no dialog to dismiss).
async function setupWebhook(name) {
  setupNotes[name] = { text: "Setting up the Webhook plugin…", cls: "muted", busy: true };
  if (lastStatus) renderStatus(lastStatus);
  try {
    const res = await postJson(`/api/servers/${encodeURIComponent(name)}/setup-webhook`,
      { public_url: location.origin });
    setupNotes[name] = { text: res.message, cls: "ok" };
  } catch (err) {
    setupNotes[name] = { text: `Could not set up the Webhook plugin: ${err.message}`, cls: "bad" };
  }
  if (lastStatus) renderStatus(lastStatus);
  refresh();
}

// Each state's colour (its words: state_word); "resolved": it failed, but the target holds it now.
const STATE_TONE = { failed: "bad", skipped: "warn", waiting: "warn", unreachable: "warn", resolved: "ok" };

function renderProblems(jobs, pipeline) {
  const rows = jobs.map((j) => {
    const ids = j.ids || [j.id];
    const cls = STATE_TONE[j.state] || "warn";
    const buttons = j.state === "resolved"
      ? [el("button", { type: "button", "aria-label": `Dismiss job ${j.id}`, onclick: () => act("discard", ids) }, "Dismiss")]
      : [el("button", { type: "button", "aria-label": `Retry job ${j.id} now`, onclick: () => act("retry", ids) }, "Retry now"),
         el("button", { type: "button", "aria-label": `Discard job ${j.id}`, onclick: () => act("discard", ids) }, "Discard")];
    return el("tr", { "data-job": j.id },
      el("td", { "data-label": "When" }, ago(j.created_at)),
      el("td", { "data-label": "User" }, j.username),
      el("td", { "data-label": "Item" }, j.item_name),
      el("td", { "data-label": "Change" }, (j.fields || [j.field]).map((f) => word("field", f)).join(", ")),
      el("td", { "data-label": "To" }, j.target_server),
      el("td", { class: cls, "data-label": "Status" }, j.state_word),
      el("td", { "data-label": "Reason" }, j.last_error || ""),
      el("td", { class: "actions" }, ...buttons));
  });
  $("problems").querySelector("tbody").replaceChildren(...rows);
  $("problems").hidden = rows.length === 0;
  // Changes only show here once planned: while the pipeline itself is stuck, say that rather
  // than "Nothing is stuck" under a "Not syncing" banner.
  const empty = $("problems-empty");
  empty.textContent = pipeline.length
    ? `Nothing listed, but new changes are not being planned: ${pipeline.join("; ")}.`
    : "Nothing is stuck.";
  empty.className = pipeline.length ? "bad" : "muted";
  empty.hidden = rows.length !== 0;
  $("retry-all").hidden = !jobs.some((j) => j.state === "failed");
}

function renderUsers(u) {
  const head = el("tr", {}, el("th", {}, "User"), ...u.servers.map((s) => el("th", {}, s)));
  const rows = u.users.map((p) => el("tr", {},
    el("td", {}, p.name, p.synced ? "" : el("span", { class: "muted" }, " (not synced)")),
    ...u.servers.map((s) => {
      const a = p.servers[s];
      if (p.duplicates_on.includes(s)) return el("td", { class: "bad" }, "duplicates");
      return el("td", { class: a ? "ok" : "muted" }, a ? `✓${a.admin ? " admin" : ""}${a.name !== p.name ? ` (${a.name})` : ""}` : "–");
    })));
  $("users").querySelector("thead").replaceChildren(head);
  $("users").querySelector("tbody").replaceChildren(...rows);
  $("users-note").textContent = u.passwords_pending
    ? `${u.passwords_pending} generated password(s) wait to be collected: GET /api/users/passwords with the API token.`
    : "";
}

function reportBlock(title, r) {
  if (!r) return null;
  const items = [];
  for (const [person, servers] of Object.entries(r.users)) {
    for (const [server, e] of Object.entries(servers)) {
      items.push(el("li", {}, `${person} on ${server}: ${e.count}`,
        el("ul", {}, ...e.sample.map((line) => el("li", { class: "muted" }, line)))));
    }
  }
  return el("div", { class: "card" },
    el("h3", {}, title, el("span", { class: "muted" }, ago(r.finished_at || r.started_at))),
    el("p", {}, `${r.items_compared} items compared, ${r.changes} ${r.dry_run ? "would change" : "changes queued"}` +
      (r.seconds != null ? ` in ${r.seconds}\u00a0s` : "")),
    items.length ? el("ul", {}, ...items) : el("p", { class: "muted" }, "Everything agrees."),
    ...r.errors.map((e) => el("p", { class: "bad" }, e)));
}

function renderReconcile(rc) {
  const p = rc.progress || {};
  $("rec-run").disabled = $("rec-dry").disabled = !!p.running;
  $("rec-progress").textContent = p.running
    ? `${p.phase}: ${p.users_done}/${p.users_total} users, ${p.items_compared} items, ${p.changes_queued} changes`
    : "";
  const blocks = [reportBlock("Last run", rc.last_report), reportBlock("Last dry run", rc.last_dry_run)].filter(Boolean);
  $("rec-report").replaceChildren(...(blocks.length ? blocks : [el("p", { class: "muted" }, "No pass has run yet.")]));
}

const startReconcile = (dry) => post(`/api/reconcile${dry ? "?dry_run=1" : ""}`, "Could not start");

async function refresh() {
  const params = new URLSearchParams({ limit: PAGE, offset });
  for (const [key, id] of FEED_FILTERS) {
    const value = $(id).type === "datetime-local" ? isoOf($(id).value) : $(id).value.trim();
    if (value) params.set(key, value);
  }
  params.set("minutes", 60);
  try {
    // One request per refresh: /api/dashboard answers what the seven separate endpoints would.
    const d = await api(`/api/dashboard?${params}`);
    $("offline").hidden = true;
    useWords(d.words);
    renderStatus(d.status);
    renderChart("chart", "chart-total", d.timeline, ["1 h ago", "now"]);
    renderChart("chart-day", "chart-day-total", d.hourly, ["24 h ago", "now"]);
    renderFeed(d.log);
    renderProblems([...d.failed, ...d.waiting], d.status.problems || []);
    renderUsers(d.users);
    if (d.reconcile) renderReconcile(d.reconcile);
    renderHeld(d.held || []);
    renderAlerts(d.alerts);
  } catch (err) {
    $("offline").hidden = false;
    $("overall").textContent = "no answer";
    $("overall").className = "badge unhealthy";
  }
}

// The item inspector: the item on every server (how it was matched, or why not) and, for a
// person, their state side by side with the differences marked; "Sync this item now".
// Its rows, their labels and how each value is shown come with the answer (the field registry).
function shown(show, value) {
  if (value === null || value === undefined) return "–";
  if (show === "ticks") return value ? `${Math.round(value / 600000000)} min` : "0";
  if (show === "date") return ago(value);
  if (show === "like") return value ? "liked" : "disliked";
  if (value === true) return "yes";
  if (value === false) return "no";
  return String(value);
}

async function inspect(e) {
  if (e) e.preventDefault();
  const params = new URLSearchParams({ q: $("i-title").value.trim(), person: $("i-person").value.trim() });
  const box = $("inspection");
  try {
    const r = await api(`/api/inspect?${params}`);
    if (!r.item) { box.replaceChildren(el("p", { class: "muted" }, "No item with that title on any server.")); return; }
    const head = el("tr", {}, el("th", {}, ""), ...r.servers.map((s) => el("th", {}, s.server)));
    const found = el("tr", {}, el("th", {}, "found"),
      ...r.servers.map((s) => el("td", { class: s.found ? "" : "bad" }, s.matched_by)));
    const rows = r.person ? r.fields.map((f) => el("tr", { class: r.different.includes(f.name) ? "differs" : "" },
      el("th", {}, f.label + (r.different.includes(f.name) ? " ≠" : "")),
      ...r.servers.map((s) => el("td", {}, s.state ? shown(f.show, s.state[f.name]) : (s.state_error || "–"))))) : [];
    const sync = el("button", { type: "button", class: "sync-now", onclick: async () => {
      try {
        const res = await postJson("/api/inspect/sync", { item: r.item.id, person: r.person });
        alert(`${res.queued} change(s) queued`);
      } catch (err) { alert(`Could not sync it: ${err.message}`); }
      setTimeout(inspect, 1500);
    } }, "Sync this item now");
    box.replaceChildren(
      el("h3", {}, r.item.name),
      el("div", { class: "table-wrap" }, el("table", { class: "inspect" }, el("tbody", {}, head, found, ...rows))),
      // An item on one server alone has nowhere to go: that is said, and nothing is offered
      // (unless a path_sync_policy has its changes wait for it to be imported elsewhere).
      r.only_on ? el("p", { class: "muted", id: "only-on" }, r.open_changes.some((j) => j.state === "waiting")
        ? `Only on ${r.only_on} for now: its changes wait for it to be imported (path_sync_policy).`
        : `Only on ${r.only_on}: no other server has this item, so there is nothing to sync. Once another ` +
          "server's library has it, its next change or a reconciliation pass syncs it.")
        : r.person ? sync : el("p", { class: "muted" }, "Give a person to compare their state."),
      ...r.open_changes.map((j) => el("p", { class: "warn" }, `${j.state_word}: ${j.field_word} → ${j.target_server}: ${j.last_error || ""}`)),
      ...r.recent.slice(0, 5).map((x) => el("p", { class: "muted" }, `${ago(x.at)}: ${x.username} ${change(x)} ${x.source} → ${x.target}: ${x.result_word}`)));
  } catch (err) {
    box.replaceChildren(el("p", { class: "bad" }, err.message));
  }
}
$("inspect").addEventListener("submit", inspect);

$("filters").addEventListener("submit", (e) => e.preventDefault());  // the filters apply as you type
$("rec-run").addEventListener("click", () => startReconcile(false));
$("retry-all").addEventListener("click", () => post("/api/events/retry-all", "Could not retry"));
$("rec-dry").addEventListener("click", () => startReconcile(true));
$("prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); refresh(); });
$("next").addEventListener("click", () => { offset += PAGE; refresh(); });
for (const [, id] of FEED_FILTERS) {
  $(id).addEventListener("input", () => { offset = 0; refresh(); });
}
refresh();
// Nobody looks at a hidden tab: it asks for nothing until it is shown again.
setInterval(() => { if (document.visibilityState === "visible") refresh(); }, 2000);
document.addEventListener("visibilitychange", () => { if (document.visibilityState === "visible") refresh(); });
