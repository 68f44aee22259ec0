// confab.js: a small client for the Confab WebSocket protocol.
//
//   import { Confab } from "/confab.js";
//   const chat = new Confab("ws://localhost:8080/ws");
//   chat.addEventListener("message", (e) => console.log(e.detail));
//   chat.connect();
//   await chat.login("alice", "secret-password");
//   await chat.join("general");
//   await chat.send("general", "hello");
//
// What it does for you:
// - every request is a promise: resolved with the `ok` reply, rejected with
//   a ConfabError carrying the protocol's `code` (and `retryAfterMs`);
// - it reconnects with backoff, logs in again with the saved token, and
//   `sync`s what was missed;
// - `message` events come in seq order per room, each once: a gap is filled
//   from `history` before anything after it is dispatched;
// - `send` and `dm` go through an outbox: typed while offline, they are sent
//   on return, with a nonce, so none is lost or duplicated (the outbox is
//   kept in localStorage, so it survives a reload too).
//
// Events (CustomEvent, the payload in `detail`): state, message, joined,
// left, topic, read, typing, presence, notice, shutdown, outbox, loggedout.

export class ConfabError extends Error {
  constructor(code, message, retryAfterMs) {
    super(message);
    this.code = code;
    this.retryAfterMs = retryAfterMs;
  }
}

const BACKOFF_MS = [250, 1000, 2000, 5000, 10000];

function nonce() {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export class Confab extends EventTarget {
  #url;
  #storage;
  #ws = null;
  #nextId = 0;
  #pending = new Map();
  #state = "offline";
  #wanted = false;
  #attempt = 0;
  #timer = null;
  #lastSeq = new Map();
  #roomQueue = new Map();
  #outbox = [];
  #waiters = new Map();
  #flushing = false;

  /** `url`: the WebSocket endpoint; `storage`: where the token and the outbox live. */
  constructor(url, { storage = globalThis.localStorage } = {}) {
    super();
    this.#url = url;
    this.#storage = storage;
    this.user = null;
    this.hello = null;
  }

  /** "connecting", "online" (connected and logged in), "connected" (not logged in) or "offline". */
  get state() {
    return this.#state;
  }

  get token() {
    return this.#storage?.getItem("confab.token") ?? null;
  }

  /** Messages waiting to be sent: [{ id, room, to, body, nonce }]. */
  get outbox() {
    return this.#outbox.map(({ resolve, reject, ...item }) => item);
  }

  /** Open the connection, and keep it open until `disconnect`. */
  connect() {
    this.#wanted = true;
    if (!this.#ws) this.#open();
  }

  disconnect() {
    this.#wanted = false;
    clearTimeout(this.#timer);
    this.#ws?.close(1000);
  }

  #setState(state) {
    if (state === this.#state) return;
    this.#state = state;
    this.#emit("state", state);
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  #open() {
    this.#setState("connecting");
    const ws = new WebSocket(this.#url);
    this.#ws = ws;
    ws.onmessage = (e) => this.#frame(JSON.parse(e.data));
    ws.onclose = () => {
      if (this.#ws !== ws) return;
      this.#ws = null;
      for (const { reject } of this.#pending.values()) {
        reject(new ConfabError("unavailable", "the connection was lost"));
      }
      this.#pending.clear();
      this.#setState("offline");
      if (this.#wanted) this.#reconnectLater();
    };
  }

  #reconnectLater(ms) {
    const base = ms ?? BACKOFF_MS[Math.min(this.#attempt, BACKOFF_MS.length - 1)];
    this.#attempt += 1;
    clearTimeout(this.#timer);
    this.#timer = setTimeout(() => this.#open(), base * (0.75 + Math.random() / 2));
  }

  async #welcome() {
    this.#attempt = 0;
    this.#setState("connected");
    if (!this.token) return;
    try {
      const r = await this.request("resume", { token: this.token });
      await this.#loggedIn(r.user);
    } catch (e) {
      if (e.code === "unauthorized") this.#forget();
    }
  }

  async #loggedIn(user) {
    this.user = user;
    this.#loadOutbox();
    this.#setState("online");
    await this.#catchUp();
    this.#flush();
  }

  #forget() {
    this.#storage?.removeItem("confab.token");
    this.user = null;
    this.#lastSeq.clear();
    this.#emit("loggedout", null);
    if (this.#ws) this.#setState("connected");
  }

  #frame(frame) {
    if (frame.type === "hello") {
      this.hello = frame;
      this.#welcome();
      return;
    }
    if (frame.type === "ok" || frame.type === "error" || frame.type === "pong") {
      const waiter = this.#pending.get(frame.id);
      if (!waiter) return;
      this.#pending.delete(frame.id);
      if (frame.type === "error") {
        waiter.reject(new ConfabError(frame.code, frame.message, frame.retry_after_ms));
      } else {
        waiter.resolve(frame);
      }
      return;
    }
    if (frame.type === "message") {
      this.#inOrder(frame.room, () => this.#deliver(frame));
      return;
    }
    if (frame.type === "shutdown") {
      this.#emit("shutdown", frame);
      this.#attempt = 0;
      return;
    }
    this.#emit(frame.type, frame);
  }

  /** Send a request; resolves with the `ok` reply. */
  request(type, fields = {}) {
    const ws = this.#ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) {
      return Promise.reject(new ConfabError("unavailable", "not connected"));
    }
    const id = ++this.#nextId;
    return new Promise((resolve, reject) => {
      this.#pending.set(id, { resolve, reject });
      ws.send(JSON.stringify({ ...fields, type, id }));
    });
  }

  // --- accounts ---

  async register(user, password) {
    const r = await this.request("register", { user, password });
    this.#storage?.setItem("confab.token", r.token);
    await this.#loggedIn(r.user);
    return r;
  }

  async login(user, password) {
    const r = await this.request("login", { user, password });
    this.#storage?.setItem("confab.token", r.token);
    await this.#loggedIn(r.user);
    return r;
  }

  async guest(user) {
    const r = await this.request("guest", { user });
    await this.#loggedIn(r.user);
    return r;
  }

  async logout() {
    try {
      await this.request("logout");
    } finally {
      this.#forget();
    }
  }

  // --- rooms ---

  async join(room) {
    const r = await this.request("join", { room });
    this.#seen(r.room, r.last_seq);
    return r;
  }

  leave(room) {
    return this.request("leave", { room });
  }

  async rooms(all = false) {
    // A listing says what exists, not what this page has seen: marking
    // `last_seq` seen here made the `sync` after a reconnect drop every
    // message it brought as a duplicate. Only delivered messages (and a
    // join's starting point) count as seen.
    return this.#allPages("rooms", { all }, (r) => r.room);
  }

  async members(room) {
    return this.#allPages("members", { room }, (m) => m.user);
  }

  /** Every page of a `rooms` or `members` listing, following `after`. */
  async #allPages(type, fields, key) {
    const items = [];
    let after;
    for (;;) {
      const r = await this.request(type, { ...fields, after });
      const page = r[type];
      items.push(...page);
      if (!r.more || page.length === 0) return items;
      after = key(page[page.length - 1]);
    }
  }

  setTopic(room, topic) {
    return this.request("topic", { room, topic });
  }

  /** A page of history: `{ before }`, `{ after }` or the newest; `{ messages, more }`. */
  async history(room, { before, after, limit } = {}) {
    const r = await this.request("history", { room, before, after, limit });
    for (const m of r.messages) this.#seen(room, m.seq);
    return r;
  }

  read(room, seq) {
    return this.request("read", { room, seq });
  }

  typing(room) {
    return this.request("typing", { room });
  }

  // --- editing, deleting, moderating ---

  /** Replace the body of one's message `seq`; a new entry of the log. */
  edit(room, seq, body) {
    return this.request("edit", { room, seq, body, nonce: nonce() });
  }

  /** Delete message `seq` (one's own, or anyone's for a moderator). */
  delete(room, seq) {
    return this.request("delete", { room, seq, nonce: nonce() });
  }

  /**
   * A moderation request: `kick`, `ban`, `unban`, `mute`, `unmute`
   * (`{ reason, durationMs }` where they apply), or `role` (`{ role }`).
   */
  moderate(action, room, user, { reason, durationMs, role } = {}) {
    return this.request(action, { room, user, reason, duration_ms: durationMs, role });
  }

  async bans(room) {
    return (await this.request("bans", { room })).bans;
  }

  // --- hubs ---

  /** Create a hub; resolves with its snapshot (`{ hub, title, private, role, channels, members }`). */
  hubCreate(hub, { title, private: isPrivate } = {}) {
    return this.request("hub_create", { hub, title, private: isPrivate });
  }

  /** Join a hub (with an invite code for a private one); resolves with its snapshot. */
  hubJoin(hub, invite) {
    return this.request("hub_join", { hub, invite });
  }

  hubLeave(hub) {
    return this.request("hub_leave", { hub });
  }

  /** The caller's hubs, or with `all` every public hub. */
  async hubs(all = false) {
    return (await this.request("hubs", { all })).hubs;
  }

  /** A hub's snapshot. */
  hub(hub) {
    return this.request("hub", { hub });
  }

  channelCreate(hub, channel, { private: isPrivate, topic } = {}) {
    return this.request("channel_create", { hub, channel, private: isPrivate, topic });
  }

  /** An invite code to a hub (`{ hub }`) or a private channel (`{ room }`): `{ code, expires_ts }`. */
  invite(place, { user, expiresMs } = {}) {
    return this.request("invite", { ...place, user, expires_ms: expiresMs });
  }

  // --- messages, through the outbox ---

  /** Send to a room; resolves with `{ room, seq, ts }` once stored, even after a reconnect. */
  send(room, body) {
    return this.#enqueue({ room, body });
  }

  /** A direct message; resolves like `send`. */
  dm(to, body) {
    return this.#enqueue({ to, body });
  }

  #enqueue(item) {
    return new Promise((resolve, reject) => {
      this.#outbox.push({ ...item, nonce: nonce(), resolve, reject });
      this.#saveOutbox();
      this.#flush();
    });
  }

  #outboxKey() {
    return `confab.outbox.${(this.user ?? "").toLowerCase()}`;
  }

  #saveOutbox() {
    if (!this.user) return;
    this.#storage?.setItem(this.#outboxKey(), JSON.stringify(this.outbox));
    this.#emit("outbox", this.outbox);
  }

  #loadOutbox() {
    const saved = JSON.parse(this.#storage?.getItem(this.#outboxKey()) ?? "[]");
    const known = new Set(this.#outbox.map((m) => m.nonce));
    for (const m of saved) if (!known.has(m.nonce)) this.#outbox.push(m);
    this.#emit("outbox", this.outbox);
  }

  async #flush() {
    if (this.#flushing) return;
    this.#flushing = true;
    try {
      while (this.#outbox.length && this.#state === "online") {
        const item = this.#outbox[0];
        try {
          const r = item.to
            ? await this.request("dm", { to: item.to, body: item.body, nonce: item.nonce })
            : await this.request("send", { room: item.room, body: item.body, nonce: item.nonce });
          this.#outbox.shift();
          this.#saveOutbox();
          item.resolve?.(r);
        } catch (e) {
          if (e.code === "unavailable") break; // sent again after reconnecting
          if (e.code === "rate_limited") {
            await sleep(e.retryAfterMs ?? 1000);
            continue;
          }
          this.#outbox.shift(); // refused for good: tell the caller
          this.#saveOutbox();
          item.reject?.(e);
          if (!item.reject) this.#emit("error", e);
        }
      }
    } finally {
      this.#flushing = false;
    }
  }

  // --- order and gaps ---

  /** Run `task` after the room's earlier tasks: keeps each room in order. */
  #inOrder(room, task) {
    const previous = this.#roomQueue.get(room) ?? Promise.resolve();
    const next = previous.then(task, task);
    this.#roomQueue.set(room, next.catch(() => {}));
    return next;
  }

  #seen(room, seq) {
    if (seq > (this.#lastSeq.get(room) ?? 0)) this.#lastSeq.set(room, seq);
  }

  async #deliver(m) {
    const last = this.#lastSeq.get(m.room);
    if (last !== undefined && m.seq <= last) return; // already seen
    if (last !== undefined && m.seq > last + 1) {
      // A gap: fetch what is missing first, in order.
      let after = last;
      for (;;) {
        const page = await this.request("history", { room: m.room, after, limit: 500 });
        for (const missing of page.messages) {
          if (missing.seq >= m.seq) break;
          this.#seen(m.room, missing.seq);
          this.#emit("message", missing);
          after = missing.seq;
        }
        if (!page.more || after >= m.seq - 1) break;
      }
    }
    this.#seen(m.room, m.seq);
    this.#emit("message", m);
  }

  /** After logging in again: everything after what we have seen, room by room. */
  async #catchUp() {
    for (;;) {
      const cursors = Object.fromEntries(this.#lastSeq);
      let r;
      try {
        r = await this.request("sync", { cursors, limit: 200 });
      } catch {
        return;
      }
      // `r.more`: rooms left out of this reply (its total budget).
      let more = r.more;
      for (const room of r.rooms) {
        await this.#inOrder(room.room, async () => {
          for (const m of room.messages) await this.#deliver(m);
        });
        more ||= room.more;
      }
      if (!more) return;
    }
  }
}
