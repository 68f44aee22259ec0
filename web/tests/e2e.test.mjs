// The web client in headless Chromium, against the server at CONFAB_URL.
// Run by crates/confab-server/tests/browser.rs; screenshots go to
// CONFAB_SCREENSHOTS when it is set.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import net from "node:net";
import { chromium } from "playwright-core";

const url = process.env.CONFAB_URL;
const shots = process.env.CONFAB_SCREENSHOTS;
assert.ok(url, "CONFAB_URL names the server");

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
after(() => browser.close());

async function person(at = url) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 720 } });
  const page = await context.newPage();
  page.on("pageerror", (e) => assert.fail(`page error: ${e}`));
  await page.goto(at);
  return { context, page };
}

/**
 * A TCP proxy in front of the server, to cut a page's network under it:
 * `cut()` drops every connection through it and refuses new ones until
 * `restore()`.
 */
async function flakyLink() {
  const target = new URL(url);
  const open = new Set();
  let down = false;
  const server = net.createServer((client) => {
    if (down) return client.destroy();
    const upstream = net.connect(Number(target.port), target.hostname);
    const pair = [client, upstream];
    for (const s of pair) {
      open.add(s);
      s.on("error", () => {});
      s.on("close", () => pair.forEach((t) => (t.destroy(), open.delete(t))));
    }
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}/`,
    cut() {
      down = true;
      for (const s of open) s.destroy();
    },
    restore() {
      down = false;
    },
    close() {
      this.cut();
      server.close();
    },
  };
}

async function signUp(page, name, password) {
  await page.fill("#login-name", name);
  await page.fill("#login-password", password);
  await page.click("#do-register");
  await page.waitForSelector("#chat:not([hidden])");
  assert.equal(await page.textContent("#me"), name);
}

async function join(page, room) {
  await page.fill("#join-name", room);
  await page.press("#join-name", "Enter");
  await page.waitForFunction((r) => document.querySelector("#room-title").textContent === `#${r}`, room);
}

async function say(page, text) {
  await page.fill("#composer-body", text);
  await page.press("#composer-body", "Enter");
}

/** Wait until the open room shows exactly these stored messages, in order. */
async function expectMessages(page, bodies) {
  try {
    await page.waitForFunction(
      (want) => {
        const got = [...document.querySelectorAll("#messages .message:not(.pending) .body")].map((e) => e.textContent);
        return JSON.stringify(got) === JSON.stringify(want);
      },
      bodies,
      { timeout: 10000 },
    );
  } catch {
    const got = await page.$$eval("#messages .message .body", (els) => els.map((e) => e.textContent));
    assert.deepEqual(got, bodies);
  }
}

async function shot(page, name) {
  if (shots) await page.screenshot({ path: `${shots}/${name}.png` });
}

test("two people chat; one goes away, misses messages, comes back and sees them once, in order", async () => {
  const alice = await person();
  const bob = await person();
  await shot(alice.page, "login");
  await signUp(alice.page, "alice", "alice-password");
  await signUp(bob.page, "bob", "bob-password");
  await join(alice.page, "general");
  await join(bob.page, "general");

  await say(alice.page, "hello bob");
  await expectMessages(bob.page, ["hello bob"]);
  await say(bob.page, "hi alice");
  await expectMessages(alice.page, ["hello bob", "hi alice"]);

  await bob.page.close();
  for (let i = 1; i <= 3; i++) await say(alice.page, `while you were away ${i}`);
  await alice.page.fill("#dm-to", "bob");
  await alice.page.fill("#dm-body", "a private word");
  await alice.page.click("#dm-form button");
  await alice.page.waitForFunction(() => document.querySelector("#room-title").textContent === "@bob");
  await expectMessages(alice.page, ["a private word"]);

  // Bob comes back: the session resumes from the saved token.
  const page = await bob.context.newPage();
  await page.goto(url);
  await page.waitForSelector("#chat:not([hidden])");
  assert.equal(await page.textContent("#me"), "bob");
  await expectMessages(page, [
    "hello bob", "hi alice", "while you were away 1", "while you were away 2", "while you were away 3",
  ]);
  const dm = page.locator("#dms button", { hasText: "@alice" });
  await dm.waitFor();
  await dm.click();
  await expectMessages(page, ["a private word"]);

  // A reload keeps the session.
  await page.reload();
  await page.waitForSelector("#chat:not([hidden])");
  assert.equal(await page.textContent("#me"), "bob");
  await expectMessages(page, ["a private word"]);

  await page.click("#members-toggle");
  await page.waitForSelector("#members-list li.online");
  await alice.page.click("#rooms button");
  await shot(alice.page, "chat");
  await alice.context.close();
  await bob.context.close();
});

test("messages written offline are sent once when back, even across a reload", async () => {
  const carol = await person();
  const dave = await person();
  await signUp(carol.page, "carol", "carol-password");
  await signUp(dave.page, "dave", "dave-password");
  await join(carol.page, "offline");
  await join(dave.page, "offline");

  await carol.page.evaluate(() => window.confabClient.disconnect());
  await carol.page.waitForSelector("#status:not([hidden])");
  await say(carol.page, "written offline 1");
  await say(carol.page, "written offline 2");
  await carol.page.waitForFunction(() => document.querySelectorAll("#messages .message.pending").length === 2);
  await shot(carol.page, "offline");
  // The outbox survives a reload; the page connects again and sends it.
  await carol.page.reload();
  await expectMessages(dave.page, ["written offline 1", "written offline 2"]);
  await expectMessages(carol.page, ["written offline 1", "written offline 2"]);
  await carol.context.close();
  await dave.context.close();
});

test("after its connection comes back the open page shows what it missed, once, in order", async (t) => {
  const link = await flakyLink();
  t.after(() => link.close()); // also when the test fails: a listening proxy keeps node alive
  const frank = await person(link.url);
  const grace = await person();
  await signUp(frank.page, "frank", "frank-password");
  await signUp(grace.page, "grace", "grace-password");
  await join(frank.page, "flaky");
  await join(grace.page, "flaky");
  await say(grace.page, "before the cut");
  await expectMessages(frank.page, ["before the cut"]);

  // The network drops under Frank's open page; Grace goes on writing, and
  // so does Frank, into his outbox.
  link.cut();
  await frank.page.waitForSelector("#status:not([hidden])");
  for (let i = 1; i <= 3; i++) await say(grace.page, `during the cut ${i}`);
  await say(frank.page, "written while cut off");
  await frank.page.waitForFunction(() => document.querySelectorAll("#messages .message.pending").length === 1);
  const missed = ["before the cut", "during the cut 1", "during the cut 2", "during the cut 3"];
  await expectMessages(grace.page, missed);

  // It comes back by itself: no reload.
  link.restore();
  const all = [...missed, "written while cut off"];
  await expectMessages(frank.page, all);
  await expectMessages(grace.page, all);
  await say(grace.page, "after the cut");
  await expectMessages(frank.page, [...all, "after the cut"]);
  assert.equal(await frank.page.evaluate(() => window.confabClient.outbox.length), 0);
  await frank.context.close();
  await grace.context.close();
});

test("errors are shown in words, and the page fits a phone", async () => {
  const erin = await person();
  await erin.page.setViewportSize({ width: 390, height: 760 });
  await signUp(erin.page, "erin", "erin-password");
  await join(erin.page, "phone");
  await say(erin.page, "x".repeat(5000));
  await erin.page.waitForSelector("#toast:not([hidden])");
  assert.match(await erin.page.textContent("#toast"), /Too long/);
  await say(erin.page, "short and fine");
  await expectMessages(erin.page, ["short and fine"]);
  // Narrow: the room fills the screen, the rooms list is one tap away.
  assert.equal(await erin.page.isVisible("#sidebar"), false);
  await shot(erin.page, "phone");
  await erin.page.click("#back");
  assert.equal(await erin.page.isVisible("#sidebar"), true);
  // Keyboard: the composer is reachable and Enter sends.
  await erin.page.click("#rooms button");
  await erin.page.focus("#composer-body");
  await erin.page.keyboard.type("typed with the keyboard");
  await erin.page.keyboard.press("Enter");
  await expectMessages(erin.page, ["short and fine", "typed with the keyboard"]);
  await erin.context.close();
});

/** Open the members panel and wait for `user` to be listed. */
async function showMembers(page, user) {
  if ((await page.getAttribute("#members-toggle", "aria-expanded")) !== "true") {
    await page.click("#members-toggle");
  }
  await page.waitForSelector(`#members-list li[data-user="${user.toLowerCase()}"]`);
}

test("a moderator gives roles and bans a member, who is put out at once", async () => {
  const olga = await person();
  const mike = await person();
  const pete = await person();
  await signUp(olga.page, "olga", "olga-password");
  await signUp(mike.page, "mike", "mike-password");
  await signUp(pete.page, "pete", "pete-password");
  await join(olga.page, "garden");
  await join(mike.page, "garden");
  await join(pete.page, "garden");

  // Olga made the room: she owns it, and makes Mike a moderator.
  await showMembers(olga.page, "pete");
  assert.equal(await olga.page.textContent('#members-list li[data-user="olga"] .role'), "owner");
  await olga.page.selectOption('select[aria-label="Moderate mike"]', "role:moderator");
  await showMembers(mike.page, "mike");
  await mike.page.waitForSelector('#members-list li[data-user="mike"] .role.moderator');
  // A moderator can act on members, not on the owner.
  assert.equal(await mike.page.$('select[aria-label="Moderate olga"]'), null);
  await shot(mike.page, "moderator-menu");

  await say(pete.page, "buy cheap stuff");
  await expectMessages(mike.page, ["buy cheap stuff"]);
  await mike.page.selectOption('select[aria-label="Moderate pete"]', "ban:86400000");
  // Pete is told, and the room leaves his page.
  await pete.page.waitForFunction(() => /mike removed you from #garden/.test(document.querySelector("#toast").textContent));
  await pete.page.waitForFunction(() => !document.querySelector('#rooms button[data-room="garden"]'));
  await olga.page.waitForFunction(() => !document.querySelector('#members-list li[data-user="pete"]'));
  // He cannot come back while the ban holds.
  await pete.page.fill("#join-name", "garden");
  await pete.page.press("#join-name", "Enter");
  await pete.page.waitForFunction(() => /Not allowed: you are banned from garden/.test(document.querySelector("#toast").textContent));
  for (const p of [olga, mike, pete]) await p.context.close();
});

test("people edit and delete their messages; moderators delete others'", async () => {
  const nina = await person();
  const omar = await person();
  await signUp(nina.page, "nina", "nina-password");
  await signUp(omar.page, "omar", "omar-password");
  await join(nina.page, "notes");
  await join(omar.page, "notes");
  await say(nina.page, "helo everyone");
  await say(omar.page, "hi nina");
  await expectMessages(omar.page, ["helo everyone", "hi nina"]);

  // Nina fixes her typo: both pages show the new text, marked edited.
  nina.page.once("dialog", (d) => d.accept("hello everyone"));
  await nina.page.click('#messages button[aria-label="Edit message 1"]');
  await expectMessages(omar.page, ["hello everyone", "hi nina"]);
  await omar.page.waitForSelector('#messages li[data-seq="1"] .edited');
  // Omar may not edit or delete hers.
  assert.equal(await omar.page.$('#messages li[data-seq="1"] .actions'), null);
  await shot(nina.page, "edited");

  // Omar deletes his own message; Nina, owning the room, could too.
  omar.page.once("dialog", (d) => d.accept());
  await omar.page.click('#messages button[aria-label="Delete message 2"]');
  await expectMessages(nina.page, ["hello everyone", "This message was deleted."]);
  await nina.page.waitForSelector('#messages li[data-seq="2"].deleted');
  // After a reload the page shows the room as it is now, from history.
  await omar.page.reload();
  await omar.page.waitForSelector("#chat:not([hidden])");
  await expectMessages(omar.page, ["hello everyone", "This message was deleted."]);
  assert.ok(await omar.page.$('#messages li[data-seq="1"] .edited'));
  await nina.context.close();
  await omar.context.close();
});

test("a person creates a private hub, invites a friend with a link, gives a role, adds a channel", async () => {
  const hana = await person();
  const ivan = await person();
  await signUp(hana.page, "hana", "hana-password");
  await hana.page.fill("#hub-name", "crew");
  await hana.page.check("#hub-private");
  await hana.page.click("#hub-create");
  await hana.page.waitForFunction(() => document.querySelector("#room-title").textContent === "#crew/general");
  await hana.page.waitForSelector('#hubs section[data-hub="crew"] button[data-room="crew/general"]');
  await say(hana.page, "welcome aboard");

  // Without the link the private hub is closed to Ivan.
  await signUp(ivan.page, "ivan", "ivan-password");
  await ivan.page.fill("#hub-name", "crew");
  await ivan.page.click("#hub-join");
  await ivan.page.waitForFunction(() => /Not allowed: the hub crew is private/.test(document.querySelector("#toast").textContent));

  // Hana makes an invite link; Ivan opens it and is in.
  const shown = new Promise((resolve) =>
    hana.page.once("dialog", (d) => {
      resolve(d.defaultValue());
      d.accept();
    }),
  );
  await hana.page.click('button[aria-label="Invite to crew"]');
  const link = await shown;
  assert.match(link, /#hub=crew&invite=[0-9a-f]+$/);
  await ivan.page.goto(link);
  await ivan.page.waitForFunction(() => document.querySelector("#room-title").textContent === "#crew/general");
  await expectMessages(ivan.page, ["welcome aboard"]);
  assert.equal(await ivan.page.$('button[aria-label="Invite to crew"]'), null, "members do not invite");

  // Hana makes Ivan a moderator of the hub from the member list.
  await showMembers(hana.page, "ivan");
  await hana.page.selectOption('select[aria-label="Moderate ivan"]', "role:moderator");
  await showMembers(ivan.page, "ivan");
  await ivan.page.waitForSelector('#members-list li[data-user="ivan"] .role.moderator');

  // A new channel reaches Ivan's sidebar.
  hana.page.once("dialog", (d) => d.accept("plans"));
  await hana.page.click('button[aria-label="New channel in crew"]');
  await ivan.page.waitForSelector('#hubs button[data-room="crew/plans"]');
  await ivan.page.click('#hubs button[data-room="crew/plans"]');
  await say(ivan.page, "first plan");
  await hana.page.waitForFunction(() => document.querySelector("#room-title").textContent === "#crew/plans");
  await expectMessages(hana.page, ["first plan"]);
  await shot(hana.page, "hubs");
  await hana.context.close();
  await ivan.context.close();
});
