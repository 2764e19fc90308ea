// Side by side: the same automerge-repo load against tandem's /automerge endpoint and against
// automerge-repo's own Node sync server (js-server.mjs). Not part of CI; see
// docs/automerge-repo.md for the command and the figures.
//
//   node bench.mjs --tandem ../../target/release/tandem [--docs 2000] [--clients 4]
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

if (args[0] === "--worker") {
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
  process.stdout.write(JSON.stringify({ ms, ids }) + "\n", () => process.exit(0))
}

function rss(pid) {
  try {
    const s = readFileSync(`/proc/${pid}/status`, "utf8")
    const kb = k => Number((s.match(new RegExp(`${k}:\\s+(\\d+)`)) ?? [0, 0])[1])
    return { rss: kb("VmRSS") / 1024, hwm: kb("VmHWM") / 1024 }
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
    docs,
    clients,
    createAndAckMs: Math.round(createMs),
    findAllMs: Math.round(findMs),
    wallMs: Math.round(createWallMs + findWallMs),
    serverCpuS: +serverCpuS.toFixed(2),
    idleRssMiB: +idle.rss.toFixed(1),
    rssAfterCreateMiB: +afterCreate.rss.toFixed(1),
    peakRssMiB: +peak.toFixed(1),
    endRssMiB: +end.rss.toFixed(1),
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
