import logging
from beam_bpy import BeamServer

# Setup logging
logging.basicConfig(level=logging.INFO)

# Create server instance
server = BeamServer(
    node_name="beam_bpy",
    cookie="beam_bpy_cookie",
    host="localhost",
    port=0  # Auto-select port
)

# Register custom handlers (any Python function)
def handle_ping(args: str) -> str:
    return "pong"

def handle_custom_operation(args: str) -> dict:
    return {"status": "processed", "data": args}

server.register_handler("ping", handle_ping)
server.register_handler("my_operation", handle_custom_operation)

# Start server
if server.start():
    print(f"Server started at {server.get_address()}")
    # Handlers now available to Elixir/Erlang clients via RPC
else:
    print("Failed to start server")
