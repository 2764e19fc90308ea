// Side by side: the same automerge-repo load against tandem's /automerge endpoint and against
// automerge-repo's own Node sync server (js-server.mjs). Not part of CI; see
// docs/automerge-repo.md for the command and the figures.
//
//   node bench.mjs --tandem ../../target/release/tandem [--docs 2000] [--clients 4] [--thin]
//
// The clients are automerge-repo `Repo`s with the WebSocket client adapter; with `--thin` they
// are scripted protocol clients instead (see thinWorker), so that the clients' own cost, which
// dominates on a small machine, does not hide the servers'.
//
// Phase "create": client processes create the documents and wait until the server has
// acknowledged every one (the server's storageId sync state equals the document's heads).
// Phase "find": fresh client processes find all of them (request -> sync) until each is ready.
// Phase times are measured inside the clients, from the server's `peer` message on (process
// start-up excluded); `wallMs` includes it. Memory is the server process's resident set (peak over the run, and at the end), from /proc.

import { spawn } from "node:child_process"
import { mkdtempSync, readFileSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import path from "node:path"
import readline from "node:readline"
import { fileURLToPath } from "node:url"

const here = path.dirname(fileURLToPath(import.meta.url))
const args = process.argv.slice(2)
const opt = (name, dflt) => {
  const i = args.indexOf(`--${name}`)
  return i >= 0 ? args[i + 1] : dflt
}
const TIMEOUT_MS = Number(process.env.BENCH_TIMEOUT_MS ?? 300_000)

if (args[0] === "--worker" && args[1].startsWith("thin-")) {
  await thinWorker(args[1].slice(5), args[2], JSON.parse(args[3]))
} else if (args[0] === "--worker") {
  await worker(args[1], args[2], JSON.parse(args[3]))
} else {
  await main()
}

async function worker(mode, url, job) {
  const { Repo } = await import("@automerge/automerge-repo")
  const { WebSocketClientAdapter } = await import("@automerge/automerge-repo-network-websocket")
  const repo = new Repo({ network: [new WebSocketClientAdapter(url, 1000)], sharePolicy: async () => true })
  const deadline = setTimeout(() => {
    console.error(`worker ${mode} timed out`)
    process.exit(2)
  }, TIMEOUT_MS)
  // The server's peer message (its storageId).
  const storageId = await new Promise(resolve => {
    const check = () => {
      const p = repo.peers.find(p => repo.getStorageIdOfPeer(p))
      if (p) resolve(repo.getStorageIdOfPeer(p))
    }
    repo.networkSubsystem.on("peer", check)
    check()
  })
  const t0 = performance.now()
  let ids = []
  if (mode === "create") {
    const body = "lorem ipsum dolor sit amet ".repeat(8)
    const acked = []
    for (let i = 0; i < job.n; i++) {
      const h = repo.create({ title: `doc ${job.base + i}`, body, n: i, tags: ["bench"] })
      ids.push(h.documentId)
      acked.push(
        new Promise(resolve => {
          const same = () => {
            const info = h.getSyncInfo(storageId)
            const ours = h.heads()
            return info && info.lastHeads.length === ours.length && info.lastHeads.every(x => ours.includes(x))
          }
          if (same()) return resolve()
          const on = () => {
            if (same()) {
              h.off("remote-heads", on)
              resolve()
            }
          }
          h.on("remote-heads", on)
        })
      )
    }
    await Promise.all(acked)
  } else {
    await Promise.all(job.ids.map(id => repo.find(id)))
    ids = job.ids
  }
  const ms = performance.now() - t0
  clearTimeout(deadline)
  const u = process.cpuUsage()
  const cpuS = (u.user + u.system) / 1e6
  process.stdout.write(JSON.stringify({ ms, ids, cpuS }) + "\n", () => process.exit(0))
}

// One WebSocket, the protocol by hand, scripted so that the client does almost no work while
// it is timed. Before the clock starts it makes each document and the two sync messages a
// client sends to a server that lacks it (first its heads, then the change), by syncing with
// a local empty document. Timed: send the first message of every document, answer the
// server's reply with the second, and count the document acknowledged when a reply's heads
// cover ours. Find: send automerge-repo's `request` (an empty document's first message) and
// count the document found when a reply carries its changes.
async function thinWorker(mode, url, job) {
  const A = await import("@automerge/automerge")
  const { cbor, generateAutomergeUrl, parseAutomergeUrl } = await import("@automerge/automerge-repo")
  const { default: WebSocket } = await import("ws")
  const me = `thin-${Math.random().toString(36).slice(2)}`
  const body = "lorem ipsum dolor sit amet ".repeat(8)
  const docs = new Map() // documentId -> { first, second, heads, step }
  let ids = []
  if (mode === "create") {
    for (let i = 0; i < job.n; i++) {
      const id = parseAutomergeUrl(generateAutomergeUrl()).documentId
      const doc = A.from({ title: `doc ${job.base + i}`, body, n: i, tags: ["bench"] })
      let [st, first] = A.generateSyncMessage(doc, A.initSyncState())
      let [srv, sst] = A.receiveSyncMessage(A.init(), A.initSyncState(), first)
      const [, reply] = A.generateSyncMessage(srv, sst)
      // Without the capability flags, as a server that only takes version 1 answers.
      const { heads, need, have, changes } = A.decodeSyncMessage(reply)
      ;[, st] = A.receiveSyncMessage(doc, st, A.encodeSyncMessage({ heads, need, have, changes }))
      const [, second] = A.generateSyncMessage(doc, st)
      ids.push(id)
      docs.set(id, { first, second, heads: A.getHeads(doc), step: 0 })
    }
  } else {
    const [, request] = A.generateSyncMessage(A.init(), A.initSyncState())
    ids = job.ids
    for (const id of ids) docs.set(id, { first: request, step: 0 })
  }
  const ws = new WebSocket(url)
  ws.binaryType = "arraybuffer"
  const deadline = setTimeout(() => {
    console.error(`thin worker ${mode} timed out`)
    process.exit(2)
  }, TIMEOUT_MS)
  await new Promise(r => ws.once("open", r))
  const send = m => ws.send(cbor.encode({ ...m, senderId: me }))
  let server
  let pending = ids.length
  let finish
  const finished = new Promise(r => (finish = r))
  const done = d => {
    d.step = 2
    if (--pending === 0) finish()
  }
  let t0
  ws.on("message", raw => {
    const m = cbor.decode(new Uint8Array(raw))
    if (m.type === "peer") {
      server = m.senderId
      t0 = performance.now()
      for (const [id, d] of docs) {
        send({ type: mode === "create" ? "sync" : "request", targetId: server, documentId: id, data: d.first })
      }
    } else if (m.type === "sync") {
      const d = docs.get(m.documentId)
      if (d.step === 2) return
      const msg = A.decodeSyncMessage(m.data)
      if (mode === "create") {
        if (d.heads.every(h => msg.heads.includes(h))) done(d)
        else if (d.step === 0) {
          d.step = 1
          send({ type: "sync", targetId: server, documentId: m.documentId, data: d.second })
        }
      } else if (msg.changes.length > 0) done(d)
    } else if (m.type === "doc-unavailable" || m.type === "error") {
      console.error(`thin worker: ${JSON.stringify(m)}`)
      process.exit(3)
    }
  })
  send({ type: "join", peerMetadata: { isEphemeral: true }, supportedProtocolVersions: ["1"] })
  await finished
  const ms = performance.now() - t0
  clearTimeout(deadline)
  ws.close()
  const u = process.cpuUsage()
  const cpuS = (u.user + u.system) / 1e6
  process.stdout.write(JSON.stringify({ ms, ids, cpuS }) + "\n", () => process.exit(0))
}

function rss(pid) {
  try {
    const s = readFileSync(`/proc/${pid}/status`, "utf8")
    const kb = k => Number((s.match(new RegExp(`${k}:\\s+(\\d+)`)) ?? [0, 0])[1])
    return { rss: kb("VmRSS") / 1024, hwm: kb("VmHWM") / 1024, threads: kb("Threads") }
  } catch {
    return { rss: 0, hwm: 0 }
  }
}

// CPU seconds (user + system) the process has used so far.
function cpu(pid) {
  try {
    const f = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1].split(" ")
    return (Number(f[11]) + Number(f[12])) / 100
  } catch {
    return 0
  }
}

function startServer(kind, dir) {
  const child =
    kind === "tandem"
      ? spawn(opt("tandem"), ["relay", "--listen", "127.0.0.1:0", "--insecure-no-auth", "--data", dir], {
          stdio: ["ignore", "pipe", "ignore"],
        })
      : spawn(process.execPath, [path.join(here, "js-server.mjs"), dir], {
          cwd: here,
          stdio: ["ignore", "pipe", "inherit"],
        })
  return new Promise((resolve, reject) => {
    const rl = readline.createInterface({ input: child.stdout })
    rl.once("line", line => {
      const m = line.match(/listening on (\S+)/)
      if (!m) reject(new Error(`${kind} did not start: ${line}`))
      const url = kind === "tandem" ? `ws://${m[1]}/automerge` : `ws://${m[1]}`
      resolve({ child, url })
    })
    child.once("exit", code => reject(new Error(`${kind} exited with ${code}`)))
  })
}

function runWorker(mode, url, job) {
  if (args.includes("--thin")) mode = `thin-${mode}`
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [fileURLToPath(import.meta.url), "--worker", mode, url, JSON.stringify(job)], {
      cwd: here,
      stdio: ["ignore", "pipe", "inherit"],
    })
    let out = ""
    child.stdout.on("data", d => (out += d))
    child.on("exit", code => (code === 0 ? resolve(JSON.parse(out)) : reject(new Error(`worker exited ${code}`))))
  })
}

async function run(kind, docs, clients) {
  const dir = mkdtempSync(path.join(tmpdir(), `bench-${kind}-`))
  const { child, url } = await startServer(kind, dir)
  const idle = rss(child.pid)
  const cpu0 = cpu(child.pid)
  let peak = idle.rss
  const sampler = setInterval(() => (peak = Math.max(peak, rss(child.pid).rss)), 20)
  const per = Math.ceil(docs / clients)
  let t0 = performance.now()
  const created = await Promise.all(
    [...Array(clients).keys()].map(c => runWorker("create", url, { n: Math.min(per, docs - c * per), base: c * per }))
  )
  const createWallMs = performance.now() - t0
  const createMs = Math.max(...created.map(w => w.ms))
  const afterCreate = rss(child.pid)
  t0 = performance.now()
  const found = await Promise.all(created.map(w => runWorker("find", url, { ids: w.ids })))
  const findWallMs = performance.now() - t0
  const findMs = Math.max(...found.map(w => w.ms))
  clearInterval(sampler)
  const end = rss(child.pid)
  const serverCpuS = cpu(child.pid) - cpu0
  peak = Math.max(peak, end.hwm)
  child.kill("SIGTERM")
  await new Promise(r => child.once("exit", r))
  rmSync(dir, { recursive: true, force: true })
  return {
    server: kind,
    clientKind: args.includes("--thin") ? "thin" : "automerge-repo Repo",
    docs,
    clients,
    createAndAckMs: Math.round(createMs),
    findAllMs: Math.round(findMs),
    wallMs: Math.round(createWallMs + findWallMs),
    serverCpuS: +serverCpuS.toFixed(2),
    clientCpuS: +[...created, ...found].reduce((a, w) => a + w.cpuS, 0).toFixed(2),
    idleRssMiB: +idle.rss.toFixed(1),
    rssAfterCreateMiB: +afterCreate.rss.toFixed(1),
    peakRssMiB: +peak.toFixed(1),
    endRssMiB: +end.rss.toFixed(1),
    serverThreads: end.threads,
  }
}

async function main() {
  const docs = Number(opt("docs", 2000))
  const clients = Number(opt("clients", 4))
  if (!opt("tandem")) throw new Error("--tandem <path to the tandem binary> is required")
  const rows = []
  const kinds = opt("only") ? [opt("only")] : ["tandem", "automerge-repo"]
  for (const kind of kinds) {
    const r = await run(kind, docs, clients)
    console.log(JSON.stringify(r))
    rows.push(r)
  }
  if (rows.length < 2) return
  const [t, j] = rows
  console.log(
    JSON.stringify({
      createSpeedup: +(j.createAndAckMs / t.createAndAckMs).toFixed(2),
      findSpeedup: +(j.findAllMs / t.findAllMs).toFixed(2),
      totalSpeedup: +((j.createAndAckMs + j.findAllMs) / (t.createAndAckMs + t.findAllMs)).toFixed(2),
      serverCpuRatio: +(j.serverCpuS / t.serverCpuS).toFixed(2),
      peakMemoryRatio: +(t.peakRssMiB / j.peakRssMiB).toFixed(2),
    })
  )
}
