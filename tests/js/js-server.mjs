// automerge-repo's own Node sync server, set up as the package's README and the official
// sync server do: a WebSocketServer with NodeWSServerAdapter, a Repo with NodeFS storage, a
// share policy that announces nothing. The comparison point of bench.mjs.
//
//   node js-server.mjs <data-dir>      prints "listening on 127.0.0.1:<port>"

import { WebSocketServer } from "ws"
import { Repo } from "@automerge/automerge-repo"
import { NodeWSServerAdapter } from "@automerge/automerge-repo-network-websocket"
import { NodeFSStorageAdapter } from "@automerge/automerge-repo-storage-nodefs"
import os from "node:os"

const dir = process.argv[2]
const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 })
new Repo({
  network: [new NodeWSServerAdapter(wss)],
  storage: new NodeFSStorageAdapter(dir),
  peerId: `storage-server-${os.hostname()}`,
  sharePolicy: async () => false,
})
wss.on("listening", () => {
  console.log(`listening on 127.0.0.1:${wss.address().port}`)
})
