// The Confab web app: plain DOM over the client module in confab.js.
import { Confab } from "./confab.js";

const $ = (selector) => document.querySelector(selector);
const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
const chat = new Confab(wsUrl);

/** room name -> { room, topic, unread, lastSeq, messages: Map(seq -> msg), oldest, more, loaded, members, myRole } */
const rooms = new Map();
/** hub name -> its snapshot (`{ hub, title, private, role, channels, members }`) */
const hubs = new Map();
let current = null;
let readSent = new Map();
let typingSent = 0;
const typers = new Map();

// Roles, lowest first: a member may act on those below it.
const RANKS = ["member", "moderator", "admin", "owner"];
const rank = (role) => RANKS.indexOf(role ?? "");

// --- words for errors ---

function say(error) {
  const words = {
    rate_limited: `You are going too fast. Try again in ${Math.ceil((error.retryAfterMs ?? 1000) / 1000)} s.`,
    too_large: `Too long: ${error.message}.`,
    forbidden: `Not allowed: ${error.message}.`,
    not_found: `Not found: ${error.message}.`,
    conflict: `Taken: ${error.message}.`,
    unauthorized: `Could not sign in: ${error.message}.`,
    bad_request: `That did not work: ${error.message}.`,
    unavailable: "The server cannot be reached right now.",
  };
  toast(words[error.code] ?? `Something went wrong: ${error.message}`);
}

let toastTimer;
function toast(text) {
  const el = $("#toast");
  el.textContent = text;
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (el.hidden = true), 6000);
}

// --- connection state ---

chat.addEventListener("state", ({ detail: state }) => {
  const banner = $("#status");
  const texts = {
    connecting: "Connecting…",
    offline: "Offline. Messages you write will be sent when the connection is back.",
    connected: "",
    online: "",
  };
  banner.textContent = texts[state];
  banner.hidden = !texts[state];
  banner.dataset.state = state;
  document.body.dataset.connection = state;
  if (state === "online") showChat();
  if (state === "connected" && !chat.token) showLogin();
});

chat.addEventListener("loggedout", () => showLogin());

// --- sign in ---

function showLogin() {
  $("#chat").hidden = true;
  $("#login").hidden = false;
  $("#login-name").focus();
}

$("#login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const action = event.submitter?.value ?? "login";
  const user = $("#login-name").value.trim();
  const password = $("#login-password").value;
  try {
    if (action === "guest") await chat.guest(user);
    else if (action === "register") await chat.register(user, password);
    else await chat.login(user, password);
    $("#login-password").value = "";
  } catch (e) {
    say(e);
  }
});

$("#logout").addEventListener("click", async () => {
  await chat.logout().catch(() => {});
  rooms.clear();
  current = null;
  localStorage.removeItem("confab.room");
});

// --- the rooms list ---

async function showChat() {
  $("#login").hidden = true;
  $("#chat").hidden = false;
  $("#me").textContent = chat.user;
  await refreshRooms();
  await refreshHubs();
  if (await followInviteLink()) return;
  const wanted = localStorage.getItem("confab.room");
  const first = rooms.has(wanted) ? wanted : rooms.keys().next().value;
  if (first && current !== first) openRoom(first);
  else if (current) renderMessages();
}

function roomState(name) {
  if (!rooms.has(name)) {
    rooms.set(name, { room: name, topic: "", unread: 0, lastSeq: 0, messages: new Map(), more: true, loaded: false });
  }
  return rooms.get(name);
}

async function refreshRooms() {
  try {
    for (const r of await chat.rooms()) {
      const state = roomState(r.room);
      state.topic = r.topic;
      state.unread = r.unread;
      state.lastSeq = Math.max(state.lastSeq, r.last_seq);
    }
    renderRooms();
  } catch (e) {
    say(e);
  }
}

function other(room) {
  const [, a, b] = room.split(":");
  return a === chat.user?.toLowerCase() ? b : a;
}

function label(room) {
  return room.startsWith("dm:") ? `@${other(room)}` : `#${room}`;
}

function renderRooms() {
  for (const [list, direct] of [[$("#rooms"), false], [$("#dms"), true]]) {
    list.replaceChildren();
    for (const r of rooms.values()) {
      // Channels are listed under their hub.
      if (r.room.startsWith("dm:") !== direct || r.room.includes("/")) continue;
      list.append(roomItem(r, label(r.room)));
    }
  }
  renderHubs();
}

/** A room's entry in the sidebar: its name, its unread count; opens it. */
function roomItem(r, name) {
  const li = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "room" + (r.room === current ? " current" : "");
  button.dataset.room = r.room;
  button.textContent = name;
  if (r.room === current) button.setAttribute("aria-current", "true");
  if (r.unread > 0) {
    const badge = document.createElement("span");
    badge.className = "unread";
    badge.textContent = r.unread;
    badge.setAttribute("aria-label", `${r.unread} unread`);
    button.append(badge);
  }
  button.addEventListener("click", () => openRoom(r.room));
  li.append(button);
  return li;
}

// --- hubs ---

async function refreshHubs() {
  try {
    const mine = await chat.hubs();
    hubs.clear();
    for (const h of mine) hubs.set(h.hub, await chat.hub(h.hub));
    renderHubs();
  } catch (e) {
    say(e);
  }
}

function renderHubs() {
  const box = $("#hubs");
  box.replaceChildren();
  for (const h of hubs.values()) {
    const section = document.createElement("section");
    section.className = "hub";
    section.dataset.hub = h.hub;
    const header = document.createElement("header");
    const name = document.createElement("strong");
    name.textContent = h.title ? `${h.hub} · ${h.title}` : h.hub;
    header.append(name);
    const admin = rank(h.role) >= rank("admin");
    const tool = (label, title, run) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "link";
      button.textContent = label;
      button.setAttribute("aria-label", `${title} ${h.hub}`);
      button.addEventListener("click", run);
      header.append(button);
    };
    if (admin) {
      tool("+ channel", "New channel in", () => newChannel(h.hub));
      tool("invite", "Invite to", () => inviteTo(h.hub));
    }
    tool("leave", "Leave", () => leaveHub(h.hub));
    const list = document.createElement("ul");
    for (const c of h.channels) {
      if (c.unread === null) continue; // a channel of the hub this user is not in
      const name = `#${c.room.slice(h.hub.length + 1)}${c.private ? " 🔒" : ""}`;
      list.append(roomItem(roomState(c.room), name));
    }
    section.append(header, list);
    box.append(section);
  }
}

/** Join a hub (or create it), then open its first channel. */
async function enterHub(action, name, options = {}) {
  const h = action === "create" ? await chat.hubCreate(name, options) : await chat.hubJoin(name, options.invite);
  hubs.set(h.hub, h);
  await refreshRooms();
  openRoom(`${h.hub}/general`);
  return h;
}

$("#hub-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const action = event.submitter?.value ?? "join";
  const input = $("#hub-name");
  try {
    await enterHub(action, input.value.trim(), { private: $("#hub-private").checked });
    input.value = "";
    $("#hub-private").checked = false;
  } catch (e) {
    say(e);
  }
});

async function newChannel(hub) {
  const name = prompt(`New channel in ${hub}`);
  if (!name) return;
  try {
    const r = await chat.channelCreate(hub, name.trim());
    await refreshRooms();
    await refreshHubs();
    openRoom(r.room);
  } catch (e) {
    say(e);
  }
}

/** A link that joins the hub: shown to copy, good for a week. */
async function inviteTo(hub) {
  try {
    const { code } = await chat.invite({ hub }, { expiresMs: 7 * 24 * 3600 * 1000 });
    const link = `${location.origin}${location.pathname}#hub=${encodeURIComponent(hub)}&invite=${code}`;
    prompt(`Send this link to invite someone to ${hub} (it works for a week)`, link);
  } catch (e) {
    say(e);
  }
}

async function leaveHub(hub) {
  if (!confirm(`Leave ${hub} and all its channels?`)) return;
  try {
    await chat.hubLeave(hub);
    forgetHub(hub);
  } catch (e) {
    say(e);
  }
}

/** Drop a hub and its channels from the page. */
function forgetHub(hub) {
  hubs.delete(hub);
  for (const name of [...rooms.keys()]) if (name.startsWith(`${hub}/`)) rooms.delete(name);
  if (current?.startsWith(`${hub}/`)) closeRoom();
  renderRooms();
}

/** An invite link (`#hub=NAME&invite=CODE`) opened this page: join. */
async function followInviteLink() {
  const params = new URLSearchParams(location.hash.slice(1));
  const hub = params.get("hub");
  if (!hub) return false;
  history.replaceState(null, "", location.pathname);
  try {
    await enterHub("join", hub, { invite: params.get("invite") ?? undefined });
    toast(`Welcome to ${hub}.`);
  } catch (e) {
    say(e);
  }
  return true;
}

// An invite link opened in a tab already signed in.
window.addEventListener("hashchange", () => {
  if (chat.state === "online") followInviteLink();
});

for (const kind of ["hub_joined", "hub_left", "channel"]) {
  chat.addEventListener(kind, async ({ detail }) => {
    if (kind === "channel") await refreshRooms();
    if (!hubs.has(detail.hub)) return;
    hubs.set(detail.hub, await chat.hub(detail.hub).catch(() => hubs.get(detail.hub)));
    renderHubs();
  });
}

$("#join-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("#join-name");
  try {
    const r = await chat.join(input.value.trim());
    roomState(r.room).topic = r.topic;
    input.value = "";
    renderRooms();
    openRoom(r.room);
  } catch (e) {
    say(e);
  }
});

$("#dm-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const to = $("#dm-to").value.trim();
  const body = $("#dm-body").value;
  if (!to || !body) return;
  try {
    const r = await chat.dm(to, body);
    $("#dm-to").value = "";
    $("#dm-body").value = "";
    await refreshRooms();
    openRoom(r.room);
  } catch (e) {
    say(e);
  }
});

// --- one room ---

async function openRoom(name) {
  current = name;
  localStorage.setItem("confab.room", name);
  const state = roomState(name);
  document.body.dataset.view = "room";
  $("#room-title").textContent = label(name);
  $("#topic").textContent = state.topic || (name.startsWith("dm:") ? "Direct messages" : "No topic");
  $("#topic-edit").hidden = name.startsWith("dm:");
  renderRooms();
  renderMessages();
  if (!state.loaded) await loadOlder(name, true);
  loadMembers(name);
  $("#composer-body").focus();
  markRead();
}

async function loadOlder(name, first = false) {
  const state = roomState(name);
  if (state.loading || (!first && !state.more)) return;
  state.loading = true;
  try {
    const before = state.messages.size ? Math.min(...state.messages.keys()) : undefined;
    const page = await chat.history(name, { before, limit: 50 });
    // A page shows each message as it is now: its entries are not applied
    // again (an older edit would undo a newer one).
    for (const m of page.messages) state.messages.set(m.seq, m);
    state.more = page.more;
    state.loaded = true;
    if (name === current) {
      const list = $("#messages");
      const fromBottom = list.scrollHeight - list.scrollTop;
      renderMessages();
      if (!first) list.scrollTop = list.scrollHeight - fromBottom;
      else list.scrollTop = list.scrollHeight;
    }
  } catch (e) {
    say(e);
  } finally {
    state.loading = false;
  }
}

function renderMessages() {
  const list = $("#messages");
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  list.replaceChildren();
  if (!current) return;
  const state = roomState(current);
  if (state.loaded && !state.more) {
    const start = document.createElement("li");
    start.className = "start";
    start.textContent = "This is the beginning of the conversation.";
    list.append(start);
  }
  const seqs = [...state.messages.keys()].sort((a, b) => a - b);
  for (const seq of seqs) {
    const m = state.messages.get(seq);
    // Edit and deletion entries show in the message they change.
    if (m.edit === undefined && m.delete === undefined) list.append(messageItem(m, state));
  }
  for (const pending of chat.outbox) {
    const target = pending.room ?? (pending.to && dmRoom(pending.to));
    if (target === current) list.append(messageItem({ user: chat.user, body: pending.body, pending: true }));
  }
  if (atBottom) list.scrollTop = list.scrollHeight;
}

function dmRoom(to) {
  const pair = [chat.user.toLowerCase(), to.toLowerCase()].sort();
  return `dm:${pair[0]}:${pair[1]}`;
}

/** Take a live entry of a room's log: an edit or a deletion changes the message it names. */
function take(state, m) {
  state.messages.set(m.seq, m);
  const target = state.messages.get(m.edit ?? m.delete);
  if (!target) return;
  if (m.edit !== undefined) {
    target.body = m.body;
    target.edited_ts = m.ts;
  } else {
    target.deleted = true;
    delete target.body;
    for (const entry of state.messages.values()) if (entry.edit === m.delete) delete entry.body;
  }
}

function messageItem(m, state) {
  const li = document.createElement("li");
  li.className = "message" + (m.pending ? " pending" : "") + (m.user === chat.user ? " mine" : "") + (m.deleted ? " deleted" : "");
  if (m.seq) li.dataset.seq = m.seq;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = m.user;
  const when = document.createElement("time");
  if (m.ts) {
    when.dateTime = new Date(m.ts).toISOString();
    when.textContent = new Date(m.ts).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  } else {
    when.textContent = "sending…";
  }
  const body = document.createElement("p");
  body.className = "body";
  body.textContent = m.deleted ? "This message was deleted." : m.body;
  li.append(who, when, body);
  if (m.edited_ts && !m.deleted) {
    const edited = document.createElement("span");
    edited.className = "edited";
    edited.textContent = "edited";
    when.after(edited);
  }
  if (m.seq && !m.deleted && state) li.append(...messageActions(m, state));
  return li;
}

/** Edit for one's own messages; delete for them, and for anyone's if a moderator. */
function messageActions(m, state) {
  const mine = m.user === chat.user;
  const moderator = !state.room.startsWith("dm:") && rank(state.myRole) >= rank("moderator");
  const actions = [];
  const action = (name, label, run) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = `link ${name}`;
    button.textContent = label;
    button.setAttribute("aria-label", `${label} message ${m.seq}`);
    button.addEventListener("click", run);
    actions.push(button);
  };
  if (mine) {
    action("edit", "Edit", async () => {
      const body = prompt("Edit your message", m.body);
      if (body === null || body === m.body || !body.trim()) return;
      await chat.edit(state.room, m.seq, body).catch(say);
    });
  }
  if (mine || moderator) {
    action("delete", "Delete", async () => {
      if (!confirm(mine ? "Delete your message?" : `Delete this message of ${m.user}?`)) return;
      await chat.delete(state.room, m.seq).catch(say);
    });
  }
  if (!actions.length) return [];
  const box = document.createElement("span");
  box.className = "actions";
  box.append(...actions);
  return [box];
}

$("#messages").addEventListener("scroll", () => {
  const list = $("#messages");
  if (current && list.scrollTop < 60) loadOlder(current);
  if (list.scrollHeight - list.scrollTop - list.clientHeight < 40) markRead();
});

function markRead() {
  if (!current || document.hidden) return;
  const state = roomState(current);
  const newest = state.messages.size ? Math.max(...state.messages.keys()) : 0;
  if (newest > (readSent.get(current) ?? 0)) {
    readSent.set(current, newest);
    chat.read(current, newest).catch(() => {});
  }
  if (state.unread) {
    state.unread = 0;
    renderRooms();
  }
}
document.addEventListener("visibilitychange", markRead);

chat.addEventListener("message", ({ detail: m }) => {
  const known = rooms.has(m.room);
  const state = roomState(m.room);
  if (state.messages.has(m.seq)) return;
  take(state, m);
  state.lastSeq = Math.max(state.lastSeq, m.seq);
  if (m.room === current) {
    renderMessages();
    const list = $("#messages");
    if (m.user === chat.user) list.scrollTop = list.scrollHeight;
    markRead();
  } else if (m.user !== chat.user && m.edit === undefined && m.delete === undefined) {
    state.unread += 1;
  }
  if (!known) refreshRooms();
  else renderRooms();
});

chat.addEventListener("outbox", () => current && renderMessages());
chat.addEventListener("error", ({ detail }) => say(detail));

// --- members and presence ---

async function loadMembers(name) {
  try {
    const members = await chat.members(name);
    const state = roomState(name);
    state.members = members;
    state.myRole = members.find((m) => m.user === chat.user)?.role;
    if (name !== current) return;
    renderMembers(state);
    renderMessages();
  } catch (e) {
    say(e);
  }
}

function renderMembers(state) {
  const list = $("#members-list");
  list.replaceChildren();
  for (const m of state.members) {
    const li = document.createElement("li");
    li.dataset.user = m.user.toLowerCase();
    li.className = m.online ? "online" : "offline";
    li.title = m.online ? "online" : "offline";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = m.user;
    li.append(name);
    if (m.role !== "member") {
      const badge = document.createElement("span");
      badge.className = `role ${m.role}`;
      badge.textContent = m.role;
      li.append(badge);
    }
    const menu = memberMenu(state, m);
    if (menu) li.append(menu);
    list.append(li);
  }
}

/** What the caller may do to a member: nothing unless its role is higher. */
function memberMenu(state, member) {
  const mine = rank(state.myRole);
  if (member.user === chat.user || state.room.startsWith("dm:")) return null;
  if (mine < rank("moderator") || mine <= rank(member.role)) return null;
  const choices = [
    ["", "Moderate…"],
    ["kick", "Kick"],
    ["mute:600000", "Mute 10 minutes"],
    ["mute:3600000", "Mute 1 hour"],
    ["mute:", "Mute until unmuted"],
    ["unmute", "Unmute"],
    ["ban:3600000", "Ban 1 hour"],
    ["ban:86400000", "Ban 1 day"],
    ["ban:", "Ban for good"],
  ];
  if (mine >= rank("admin")) {
    for (const role of RANKS) {
      // An admin gives what is below it; an owner gives anything.
      if (role !== member.role && (rank(role) < mine || mine === rank("owner"))) {
        choices.push([`role:${role}`, `Make ${role}`]);
      }
    }
  }
  const select = document.createElement("select");
  select.className = "moderate";
  select.setAttribute("aria-label", `Moderate ${member.user}`);
  for (const [value, label] of choices) select.append(new Option(label, value));
  select.addEventListener("change", async () => {
    const [action, arg] = select.value.split(":");
    const label = select.selectedOptions[0].textContent;
    select.value = "";
    if (!action) return;
    const options = action === "role" ? { role: arg } : { durationMs: arg ? Number(arg) : undefined };
    try {
      await chat.moderate(action, state.room, member.user, options);
      toast(`${label}: ${member.user}, done.`);
      if (action !== "role") loadMembers(state.room);
    } catch (e) {
      say(e);
    }
  });
  return select;
}

chat.addEventListener("presence", ({ detail }) => {
  const li = document.querySelector(`#members-list li[data-user="${detail.user.toLowerCase()}"]`);
  if (li) {
    li.className = detail.online ? "online" : "offline";
    li.title = detail.online ? "online" : "offline";
  }
});

for (const kind of ["joined", "left"]) {
  chat.addEventListener(kind, ({ detail }) => {
    if (detail.room === current) loadMembers(current);
    if (kind === "left" && detail.user === chat.user) {
      rooms.delete(detail.room);
      renderRooms();
    }
  });
}

chat.addEventListener("role", async ({ detail }) => {
  // A hub's roles are its channels' roles.
  const inHub = detail.hub && current?.startsWith(`${detail.hub}/`);
  if (detail.room === current || inHub) loadMembers(current);
  if (detail.hub && hubs.has(detail.hub)) {
    hubs.set(detail.hub, await chat.hub(detail.hub).catch(() => hubs.get(detail.hub)));
    renderHubs();
  }
});

chat.addEventListener("kicked", ({ detail }) => {
  if (detail.hub) {
    forgetHub(detail.hub);
  } else {
    rooms.delete(detail.room);
    if (detail.room === current) closeRoom();
    renderRooms();
  }
  const where = detail.hub ? `the hub ${detail.hub}` : `#${detail.room}`;
  toast(`${detail.by} removed you from ${where}${detail.reason ? `: ${detail.reason}` : "."}`);
});

$("#members-toggle").addEventListener("click", () => {
  const open = document.body.dataset.members !== "open";
  document.body.dataset.members = open ? "open" : "closed";
  $("#members-toggle").setAttribute("aria-expanded", String(open));
});

// --- topic, leave ---

chat.addEventListener("topic", ({ detail }) => {
  roomState(detail.room).topic = detail.topic;
  if (detail.room === current) $("#topic").textContent = detail.topic || "No topic";
});

$("#topic-edit").addEventListener("click", async () => {
  const topic = prompt("Topic of " + label(current), roomState(current).topic);
  if (topic === null) return;
  await chat.setTopic(current, topic).catch(say);
});

$("#leave").addEventListener("click", async () => {
  if (!current) return;
  try {
    await chat.leave(current);
    rooms.delete(current);
    closeRoom();
  } catch (e) {
    say(e);
  }
});

/** Show no room (after leaving the one shown, or being put out of it). */
function closeRoom() {
  current = null;
  localStorage.removeItem("confab.room");
  document.body.dataset.view = "rooms";
  renderRooms();
  renderMessages();
  $("#members-list").replaceChildren();
  $("#room-title").textContent = "";
  $("#topic").textContent = "";
}

$("#back").addEventListener("click", () => (document.body.dataset.view = "rooms"));

// --- writing ---

$("#composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = $("#composer-body");
  const body = input.value;
  if (!body.trim() || !current) return;
  input.value = "";
  const sent = current.startsWith("dm:") ? chat.dm(other(current), body) : chat.send(current, body);
  sent.catch(say);
});

$("#composer-body").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("#composer").requestSubmit();
  }
});

$("#composer-body").addEventListener("input", () => {
  if (!current || chat.state !== "online" || Date.now() - typingSent < 3000) return;
  typingSent = Date.now();
  chat.typing(current).catch(() => {});
});

chat.addEventListener("typing", ({ detail }) => {
  const key = `${detail.room}/${detail.user}`;
  clearTimeout(typers.get(key));
  typers.set(key, setTimeout(() => {
    typers.delete(key);
    renderTyping();
  }, 4000));
  renderTyping();
});

function renderTyping() {
  const names = [...typers.keys()]
    .filter((k) => k.startsWith(`${current}/`))
    .map((k) => k.slice(current.length + 1));
  $("#typing").textContent = names.length ? `${names.join(", ")} ${names.length > 1 ? "are" : "is"} typing…` : "";
}

// --- notices from the server ---

chat.addEventListener("notice", ({ detail }) => toast(`Notice: ${detail.text}`));
chat.addEventListener("shutdown", () => toast("The server is restarting; reconnecting shortly."));

chat.connect();
if (!chat.token) showLogin();

// For the console and for tests: the client this page uses.
window.confabClient = chat;
