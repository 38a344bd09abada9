// The setup page: servers (each with a Test button), token and sign-in; Save writes the config
// file and the service starts syncing. Every call carries the setup code from the log.
// $ and el: dom.js, loaded first.

async function call(path, body) {
  const res = await fetch(path, {
    method: "POST",
    // In settings mode there is no code field: the dashboard's sign-in (a cookie) stands for it.
    headers: { "Content-Type": "application/json", "X-Setup-Code": $("code") ? $("code").value.trim() : "" },
    body: JSON.stringify(body),
  });
  const answer = await res.json().catch(() => ({}));
  if (!res.ok && !("ok" in answer)) throw new Error(answer.error || answer.detail || res.statusText);
  return answer;
}

let count = 0;
function addServer(name = "") {
  count += 1;
  const n = count;
  const out = el("p", { class: "muted", role: "status", "aria-live": "polite" });
  const row = el("fieldset", { class: "card server", "data-server": n },
    el("legend", {}, `Server ${n}`),
    el("label", {}, "Name (part of its webhook URL) ", el("input", { name: "name", value: name, required: "" })),
    el("label", {}, "URL ", el("input", { name: "url", type: "url", placeholder: "http://192.168.1.10:8096", required: "" })),
    el("label", {}, "API key ", el("input", { name: "api_key", type: "password", autocomplete: "off", required: "" })),
    el("label", {}, el("input", { name: "passwordless", type: "checkbox" }), " passwordless (home network)"),
    el("button", { type: "button", onclick: () => test(row, out) }, "Test"),
    out);
  $("servers").append(row);
}

function serverOf(row) {
  const v = (name) => row.querySelector(`[name=${name}]`);
  return { name: v("name").value.trim(), url: v("url").value.trim(), api_key: v("api_key").value.trim(),
           passwordless: v("passwordless").checked };
}

async function test(row, out) {
  out.textContent = "testing…";
  try {
    const r = await call("/api/setup/test", serverOf(row));
    out.className = r.ok ? "ok" : "bad";
    out.textContent = r.ok ? `✓ ${r.name}: Jellyfin ${r.version}, ${r.users} users` : `✗ ${r.error}`;
  } catch (err) {
    out.className = "bad";
    out.textContent = `✗ ${err.message}`;
  }
}

$("add-server").addEventListener("click", () => addServer());
$("setup").addEventListener("submit", async (e) => {
  e.preventDefault();
  const result = $("result");
  result.textContent = "saving…";
  try {
    const r = await call("/api/setup/save", {
      servers: [...document.querySelectorAll(".server")].map(serverOf),
      webhook_token: $("webhook-token").value.trim(),
      auth_username: $("auth-user").value.trim(),
      auth_password: $("auth-password").value,
      api_token: $("api-token").value.trim(),
    });
    result.className = r.ok ? "ok" : "bad";
    result.textContent = r.ok ? `✓ ${r.message}` : `✗ ${r.error}`;
    if (r.ok) setTimeout(() => { location.href = "/"; }, 1500);
  } catch (err) {
    result.className = "bad";
    result.textContent = `✗ ${err.message}`;
  }
});

// Signed in on the dashboard's /setup, the same page edits the settings in use: the servers as
// they are (never their keys: one left empty is kept), no setup code; saving applies them in place.
function settingsMode(info) {
  $("code-part").remove();
  document.querySelector("h1").textContent = "jellyfin-db-sync: settings";
  $("intro").textContent = "Change a server, add one, or set the tokens and sign-in. A key or token left " +
    "empty stays as it is. Saving keeps the old file beside the new one and applies it without a restart.";
  $("servers").replaceChildren();
  for (const s of info.servers) {
    addServer(s.name);
    const row = [...document.querySelectorAll(".server")].pop();
    row.querySelector("[name=url]").value = s.url;
    row.querySelector("[name=passwordless]").checked = s.passwordless;
    const key = row.querySelector("[name=api_key]");
    key.required = false;
    key.placeholder = "unchanged (leave empty to keep it)";
  }
  for (const [id, set] of [["webhook-token", info.set.webhook_token], ["api-token", info.set.api_token],
    ["auth-password", info.set.auth]]) {
    if (set) $(id).placeholder = "set (leave empty to keep it)";
  }
  $("save").textContent = "Save and apply";
}

fetch("/api/setup").then((r) => r.json()).then((info) => {
  $("version").textContent = `v${info.version} · the file will be ${info.config_path}`;
  if (info.mode === "settings") settingsMode(info);
  const notes = [];
  if (info.problem) {
    // Started on a file that was refused: say why, and that saving keeps the rest of it.
    const refused = !info.problem.startsWith("no configuration");  // a file is there, but was refused
    notes.push(el("p", {}, `Why this page: ${info.problem}.` + (refused ? " Saving keeps the settings of that " +
      "file this page does not show, and keeps the file itself beside it with the time in its name." : "")));
  }
  if (info.from_environment.length) {
    notes.push(el("p", {}, "Set by environment variables (they win over the file; change them in your container settings):"),
      ...info.from_environment.map(([variable, key]) => el("p", {}, el("code", {}, variable), ` → ${key}`)));
  }
  $("env").hidden = notes.length === 0;
  $("env").replaceChildren(...notes);
});
addServer("home");
addServer("");
