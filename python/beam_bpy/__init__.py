"""beam_bpy: Beam-BPy's import name for erpy.beam (doc/dropin.md).

``from beam_bpy import BeamServer`` gets erpy's BeamServer, a real Erlang node (erpy's
node mode) with Beam-BPy's constructor, handler registry and entry points.
"""

from erpy.beam import BeamServer, ErlangVariantDecoder, ErlangVariantEncoder, get_beam_server

__version__ = "0.1.0"
__all__ = ["BeamServer", "ErlangVariantEncoder", "ErlangVariantDecoder", "get_beam_server"]
