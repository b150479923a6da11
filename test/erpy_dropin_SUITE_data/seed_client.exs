# Connect to beam_bpy CNode
{:ok, _} = Node.start(:"elixir_app@127.0.0.1")
Node.set_cookie(:beam_bpy_cookie)
Node.connect(:"beam_bpy@127.0.0.1")

# Call any registered handler via Erlang RPC
# Handlers are identified by name, args are passed through
result = :rpc.call(:"beam_bpy@127.0.0.1", MyModule, :call_handler, ["ping", []])

# Or use standard Erlang distributed calls
response = :rpc.call(:"beam_bpy@127.0.0.1", BeamServer, :handle_rpc, ["my_operation", ["arg1", "arg2"]])

# ---- Above: the seed's Elixir client example, unchanged. Below: erpy's checks of it.
IO.inspect(result, label: "result")
IO.inspect(response, label: "response")
"pong" = result
%{"status" => "processed", "data" => ["arg1", "arg2"]} = response
{:error, "Unknown function: nope"} =
  :rpc.call(:"beam_bpy@127.0.0.1", BeamServer, :handle_rpc, ["nope", []])
IO.puts("seed client: ok")
