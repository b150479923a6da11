# erpy for Elixir: this Mix project builds the whole erpy application (the Erlang
# sources in ../src and the Elixir API in lib/) with no Hex dependency, offline. The
# native parts (priv/erpy_nif.so, the Python extension) come from `make` in the
# repository root, which must run first.
#
# In your project: {:erpy, path: "path/to/erpy/elixir"}
defmodule Erpy.MixProject do
  use Mix.Project

  # One source for the application's metadata: the Erlang app file.
  @app_src Path.expand("../src/erpy.app.src", __DIR__)
  @external_resource @app_src
  {:ok, [{:application, :erpy, props}]} = :file.consult(@app_src)
  @props props

  def project do
    [
      app: :erpy,
      version: to_string(@props[:vsn]),
      elixir: "~> 1.14",
      erlc_paths: ["../src"],
      erlc_options: [:debug_info],
      deps: [],
      start_permanent: false,
      name: "erpy",
      description: to_string(@props[:description]),
      docs: [main: "Erpy"]
    ]
  end

  def application do
    [
      mod: @props[:mod],
      registered: @props[:registered],
      env: @props[:env],
      extra_applications: [:logger]
    ]
  end
end
