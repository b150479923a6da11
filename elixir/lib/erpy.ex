defmodule Erpy do
  @moduledoc """
  Python from Elixir: call functions, evaluate expressions and run code in Python,
  through a pool of Python worker processes (port mode, the default), CPython inside the
  VM (`mode: :embedded`) or Python nodes (`mode: :node`).

  Options are keyword lists; Python's `None` is `nil` here (the pools this module starts
  use `none: :nil` unless told otherwise). Results are `{:ok, value}` or
  `{:error, reason}`, where a Python exception is
  `{:error, %{type: "ZeroDivisionError", message: "...", traceback: [...]}}`.

      iex> {:ok, _} = Application.ensure_all_started(:erpy)
      iex> Erpy.call(:operator, :add, [1, 2])
      {:ok, 3}
      iex> Erpy.eval("x * 2", %{"x" => 21})
      {:ok, 42}
      iex> Erpy.eval("None")
      {:ok, nil}

  Types: Elixir strings are Erlang binaries and arrive in Python as `str`; atoms arrive as
  `erpy.Atom` (a `str` subclass) and come back as atoms; maps are dicts; tuples are
  tuples. Pids, references and ports seen from Python come back as the same Erlang pids,
  references and ports. The full type mapping is in the project's README.
  """

  @typedoc "A pool's name."
  @type pool :: atom()
  @typedoc "An error: a Python exception as a map, `:timeout`, or another reason."
  @type error :: {:error, map() | atom() | tuple()}
  @typedoc "Call options: `pool:` (default `Erpy`'s default pool), `timeout:` (ms or `:infinity`), `kwargs:` (a map of keyword arguments)."
  @type call_opt :: {:pool, pool()} | {:timeout, timeout()} | {:kwargs, map()}

  @doc """
  Calls `module.function(*args)` in Python.

      iex> Erpy.call(:math, :sqrt, [16.0])
      {:ok, 4.0}
      iex> Erpy.call("builtins", "max", [[3, 9, 4]])
      {:ok, 9}
      iex> {:error, %{type: "ZeroDivisionError"}} = Erpy.call(:operator, :truediv, [1, 0])
  """
  @spec call(atom() | String.t(), atom() | String.t(), list(), [call_opt()]) :: {:ok, term()} | error()
  def call(module, function, args, opts \\ []) do
    :erpy.call(name(module), name(function), args, call_opts(opts))
  end

  @doc """
  Evaluates a Python expression with `locals` (a map of names) in scope.

      iex> Erpy.eval("a + b", %{"a" => 1, "b" => 2})
      {:ok, 3}
  """
  @spec eval(String.t(), map(), [call_opt()]) :: {:ok, term()} | error()
  def eval(expression, locals \\ %{}, opts \\ []) do
    :erpy.eval(expression, locals, call_opts(opts))
  end

  @doc """
  Runs Python statements with `arguments` in scope; what they leave in `result` is the
  answer, as `%{status: :ok, result: value}` (or `%{status: :error, error: map}` for an
  exception).

      iex> Erpy.run("result = sum(arguments)", [1, 2, 3])
      {:ok, %{status: :ok, result: 6}}
  """
  @spec run(String.t(), term(), [call_opt()]) :: {:ok, map()} | error()
  def run(code, arguments \\ nil, opts \\ []) do
    req = %{code: code, arguments: arguments}
    case Keyword.get(opts, :timeout) do
      nil -> :erpy.run(Map.merge(req, Map.new(Keyword.take(opts, [:pool]))))
      t -> :erpy.run(Map.merge(req, Map.new(Keyword.take(opts, [:pool]))), t)
    end
  end

  @doc """
  Starts a pool. Options are erpy's pool options (README, Configuration) as a keyword
  list: `mode:` (`:port`, `:embedded`, `:node`), `size:`, `allowed:`, `timeout:`, ...
  `none:` defaults to `:nil`, so Python's `None` is Elixir's `nil`.

      iex> {:ok, _} = Erpy.start_pool(:doc_pool, size: 1)
      iex> Erpy.eval("None", %{}, pool: :doc_pool)
      {:ok, nil}
      iex> Erpy.stop_pool(:doc_pool)
      :ok
  """
  @spec start_pool(pool(), keyword()) :: {:ok, pid()} | {:error, term()}
  def start_pool(name, opts \\ []) do
    :erpy.start_pool(name, Map.new(Keyword.put_new(opts, :none, nil)))
  end

  @doc "Stops a pool started with `start_pool/2`."
  @spec stop_pool(pool()) :: :ok | {:error, term()}
  def stop_pool(name), do: :erpy.stop_pool(name)

  defp name(n) when is_atom(n), do: Atom.to_string(n)
  defp name(n) when is_binary(n), do: n

  defp call_opts(opts) do
    opts = Keyword.put_new_lazy(opts, :pool, &default_pool/0)
    Map.new(opts)
  end

  # The default pool of this module: started on first use with `none: :nil`, so that
  # `None` is `nil` without every caller saying so.
  defp default_pool do
    case :erpy_transport.lookup(Erpy) do
      {:ok, _, _} ->
        Erpy

      :error ->
        case start_pool(Erpy, size: 2) do
          {:ok, _} -> Erpy
          {:error, {:already_started, _}} -> Erpy
          {:error, {:already_exists, _}} -> Erpy
          {:error, why} -> raise ArgumentError, "erpy: cannot start the default pool: #{inspect(why)}"
        end
    end
  end
end
