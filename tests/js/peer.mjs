// A scripted automerge-repo peer for tandem's interop tests (tests/it/amrepo.rs).
//
//   node peer.mjs <ws-url> [storage-dir]      (REMOTE_HEADS=1: remote heads gossiping on)
//
// Reads one JSON command per line on stdin and answers each with one JSON line on stdout
// ({"ok": true, ...} or {"error": "..."}). Waits are event-driven with a timeout, never sleeps.
// With a storage dir the peer keeps its documents and its sync state with the relay (keyed by
// the relay's storageId) across runs, as a browser's IndexedDB would.

import readline from "node:readline"
import { Repo, encodeHeads } from "@automerge/automerge-repo"
import * as A from "@automerge/automerge"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"
import { NodeFSStorageAdapter } from "@automerge/automerge-repo-storage-nodefs"

const [url, storageDir] = process.argv.slice(2)
const TIMEOUT_MS = 30_000

const repo = new Repo({
  network: [new WebSocketClientAdapter(url, 500)],
  storage: storageDir ? new NodeFSStorageAdapter(storageDir) : undefined,
  sharePolicy: async () => true,
  enableRemoteHeadsGossiping: process.env.REMOTE_HEADS === "1",
})

const handles = new Map()
const ephemeral = new Map() // documentId -> received messages
const waiters = new Set()

function wake() {
  for (const w of [...waiters]) w()
}

// Resolve when pred() is true, re-checked on every document, network or ephemeral event.
function waitFor(what, pred) {
  return new Promise((resolve, reject) => {
    let timer
    const check = () => {
      let v
      try {
        v = pred()
      } catch (e) {
        waiters.delete(check)
        clearTimeout(timer)
        reject(e)
        return
      }
      if (v !== undefined && v !== false) {
        waiters.delete(check)
        clearTimeout(timer)
        resolve(v)
      }
    }
    timer = setTimeout(() => {
      waiters.delete(check)
      reject(new Error(`timed out waiting for ${what}`))
    }, TIMEOUT_MS)
    waiters.add(check)
    check()
  })
}

repo.networkSubsystem.on("peer", wake)

function relayPeer() {
  return repo.peers.find(p => repo.getStorageIdOfPeer(p))
}

function relayStorageId() {
  const p = relayPeer()
  return p && repo.getStorageIdOfPeer(p)
}

function track(handle) {
  if (handles.has(handle.documentId)) return handle
  handles.set(handle.documentId, handle)
  handle.on("change", wake)
  handle.on("remote-heads", wake)
  handle.on("ephemeral-message", ({ message, senderId }) => {
    const list = ephemeral.get(handle.documentId) ?? []
    list.push({ message, senderId })
    ephemeral.set(handle.documentId, list)
    wake()
  })
  return handle
}

const sameSet = (a, b) =>
  a.length === b.length && [...a].sort().join() === [...b].sort().join()

function state(handle) {
  const doc = handle.doc()
  return {
    id: handle.documentId,
    // Unsigned integers (tandem's `_schema`) come out as BigInt, which JSON cannot hold.
    value: JSON.parse(JSON.stringify(doc, (_, v) => (typeof v === "bigint" ? Number(v) : v))),
    heads: A.getHeads(doc),
    titleConflicts: Object.keys(A.getConflicts(doc, "title") ?? {}).length,
  }
}

// The relay has durably stored (and acknowledged) everything this handle has.
async function acked(handle) {
  await waitFor("the relay", () => relayStorageId())
  const sid = relayStorageId()
  return waitFor("the relay to acknowledge our heads", () => {
    const info = handle.getSyncInfo(sid)
    return info && sameSet(info.lastHeads, handle.heads()) && info.lastHeads
  })
}

async function run(cmd) {
  switch (cmd.op) {
    case "ready":
      await waitFor("the relay's peer message", () => relayStorageId())
      return { storageId: relayStorageId(), peerId: relayPeer() }
    case "create": {
      const h = track(repo.create(cmd.value ?? {}))
      return { id: h.documentId, ...state(h) }
    }
    case "find": {
      try {
        const h = track(await repo.find(cmd.id))
        return state(h)
      } catch (e) {
        return { unavailable: true, message: String(e.message ?? e) }
      }
    }
    case "change": {
      const h = handles.get(cmd.id)
      h.change(d => {
        for (const [k, v] of Object.entries(cmd.set ?? {})) d[k] = v
      })
      return state(h)
    }
    case "acked": {
      const h = handles.get(cmd.id)
      const heads = await acked(h)
      return { relayHeads: heads, ...state(h) }
    }
    case "waitField": {
      const h = handles.get(cmd.id)
      await waitFor(`${cmd.field} == ${JSON.stringify(cmd.value)}`, () => {
        const d = h.doc()
        return d && JSON.stringify(d[cmd.field]) === JSON.stringify(cmd.value)
      })
      return state(h)
    }
    case "waitHeads": {
      const h = handles.get(cmd.id)
      await waitFor(`heads ${cmd.heads}`, () => sameSet(A.getHeads(h.doc()), cmd.heads))
      return state(h)
    }
    case "storageId":
      return { storageId: await repo.storageId() }
    case "subscribeRemotes":
      repo.subscribeToRemotes(cmd.storageIds)
      return {}
    case "waitRemoteHeads": {
      const h = handles.get(cmd.id)
      await waitFor(`the heads of storage ${cmd.storageId}`, () => {
        const info = h.getSyncInfo(cmd.storageId)
        return info && sameSet(info.lastHeads, cmd.heads)
      })
      return {}
    }
    case "encodedHeads":
      return { heads: handles.get(cmd.id).heads() }
    case "get":
      return state(handles.get(cmd.id))
    case "broadcast":
      handles.get(cmd.id).broadcast(cmd.message)
      return {}
    case "waitEphemeral": {
      const got = await waitFor("an ephemeral message", () => {
        const l = ephemeral.get(cmd.id)
        return l && l.length > 0 && l
      })
      return { messages: got }
    }
    case "exit":
      await repo.flush?.()
      await repo.shutdown()
      process.stdout.write(JSON.stringify({ ok: true }) + "\n", () => process.exit(0))
      return null
    default:
      throw new Error(`unknown op ${cmd.op}`)
  }
}

const rl = readline.createInterface({ input: process.stdin })
let queue = Promise.resolve()
rl.on("line", line => {
  if (!line.trim()) return
  queue = queue.then(async () => {
    let out
    try {
      out = await run(JSON.parse(line))
      if (out === null) return
      out = { ok: true, ...out }
    } catch (e) {
      out = { error: String(e?.stack ?? e) }
    }
    process.stdout.write(JSON.stringify(out) + "\n")
  })
})
rl.on("close", () => {
  queue.then(() => process.exit(0))
})
